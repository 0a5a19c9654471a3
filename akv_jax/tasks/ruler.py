"""The task registry and batch plumbing: make_batch, training sequences, batch scoring, describe."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from akv_jax.tasks import niah, tracking, words
from akv_jax.tasks.base import Sample, Task
from akv_jax.tasks.vocab import PAD, Vocab

TASKS: dict[str, Task] = {t.name: t for t in (
    niah.NIAH_SINGLE, niah.NIAH_MULTIKEY, niah.NIAH_MULTIVALUE, niah.NIAH_MULTIQUERY,
    tracking.VARIABLE_TRACKING, words.COMMON_WORDS, words.FREQUENT_WORDS)}


def get_task(name: str) -> Task:
  """The registered task called `name` (see `TASKS`)."""
  try:
    return TASKS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
  """Samples stacked into right-padded arrays.

  Attributes:
    prompts: i32[B, S] prompts, PAD after each row's length; S is the longest requested length.
    lengths: i32[B] prompt tokens per row (BOS through the query).
    answers: i32[B, A] expected generations, PAD after each row's EOS; A is the longest answer.
    answer_lengths: i32[B] answer tokens per row, EOS included.
    samples: the B samples, in row order.
  """

  prompts: np.ndarray
  lengths: np.ndarray
  answers: np.ndarray
  answer_lengths: np.ndarray
  samples: tuple[Sample, ...]

  @property
  def tasks(self) -> tuple[str, ...]:
    return tuple(s.task for s in self.samples)


def _pad(rows: Sequence[np.ndarray], width: int) -> np.ndarray:
  out = np.full((len(rows), width), PAD, np.int32)
  for i, r in enumerate(rows):
    out[i, :len(r)] = r
  return out


def make_batch(task_names: str | Sequence[str], rng: np.random.Generator, length: int | Sequence[int],
               vocab: Vocab, batch: int) -> Batch:
  """Draw `batch` samples, row i from task task_names[i % len(task_names)], in row order from `rng`.

  Args:
    task_names: one task name or several, assigned round-robin so every task gets its share of a batch.
    rng: the only source of randomness; the same generator state gives the same batch.
    length: prompt tokens of every row, or one length per row (a ragged batch, padded to the longest).
    vocab: the vocabulary.
    batch: B, rows to draw.

  Returns:
    A Batch with prompts i32[B, S], lengths i32[B], answers i32[B, A], answer_lengths i32[B].
  """
  names = [task_names] if isinstance(task_names, str) else list(task_names)
  if not names:
    raise ValueError("task_names is empty")
  tasks = [get_task(n) for n in names]
  if not isinstance(batch, (int, np.integer)) or batch < 1:
    raise ValueError(f"batch={batch!r} must be an int >= 1")
  lengths = [length] * batch if isinstance(length, (int, np.integer)) else list(length)
  if len(lengths) != batch:
    raise ValueError(f"length has {len(lengths)} entries for batch={batch}")
  samples = tuple(tasks[i % len(tasks)].generate(rng, lengths[i], vocab) for i in range(batch))
  return Batch(
      prompts=_pad([s.prompt for s in samples], max(lengths)),
      lengths=np.asarray(lengths, np.int32),
      answers=_pad([s.answer for s in samples], max(len(s.answer) for s in samples)),
      answer_lengths=np.asarray([len(s.answer) for s in samples], np.int32),
      samples=samples)


def training_sequence(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
  """Prompt then answer, for teacher forcing.

  Returns tokens i32[T + A] and loss_mask bool[T + A], True on the answer tokens. With inputs tokens[:-1] and
  targets tokens[1:], weight the loss by loss_mask[1:]: the prompt's last position predicts the first answer
  token and the last answer token before EOS predicts EOS.
  """
  tokens = np.concatenate([sample.prompt, sample.answer]).astype(np.int32)
  mask = np.zeros(len(tokens), bool)
  mask[len(sample.prompt):] = True
  return tokens, mask


def training_batch(samples: Sequence[Sample], *, length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`training_sequence` of each sample, right-padded with PAD (mask False) to `length` or the longest.

  Pass a fixed `length` so every step of a jitted training loop sees one shape.

  Returns tokens i32[B, L] and loss_mask bool[B, L].
  """
  seqs = [training_sequence(s) for s in samples]
  longest = max(len(t) for t, _ in seqs)
  width = longest if length is None else length
  if width < longest:
    raise ValueError(f"length={length} is shorter than the longest sequence, {longest} tokens")
  mask = np.zeros((len(seqs), width), bool)
  for i, (_, m) in enumerate(seqs):
    mask[i, :len(m)] = m
  return _pad([t for t, _ in seqs], width), mask


def score_batch(predictions: np.ndarray, samples: Sequence[Sample]) -> dict[str, float]:
  """Score generated ids with each sample's task rule.

  Args:
    predictions: i32[B, A'] generated ids; each row is read up to its first EOS.
    samples: the B samples the rows answer.

  Returns:
    Mean score per task (in order of first appearance) and "average", the unweighted mean over those tasks, as
    RULER reports it.
  """
  predictions = np.asarray(predictions)
  if predictions.ndim != 2 or predictions.shape[0] != len(samples):
    raise ValueError(f"predictions has shape {predictions.shape}; expected [B={len(samples)}, A]")
  per_task: dict[str, list[float]] = {}
  for row, s in zip(predictions, samples):
    per_task.setdefault(s.task, []).append(get_task(s.task).score(row, s))
  out = {name: float(np.mean(v)) for name, v in per_task.items()}
  out["average"] = float(np.mean(list(out.values()))) if out else 0.0
  return out


def describe(sample: Sample, vocab: Vocab, *, max_run: int | None = 16) -> str:
  """A readable sample: task, sizes, evidence positions, decoded prompt and answer.

  Runs of more than `max_run` filler words are shortened to their first and last 3 words around
  "...(+N words)..."; None prints every token.
  """
  names = vocab.decode(sample.prompt)
  is_word = [int(t) in vocab.word_ids for t in sample.prompt]
  parts, i = [], 0
  while i < len(names):
    j = i
    while j < len(names) and is_word[j]:
      j += 1
    if max_run is not None and j - i > max_run:
      parts += names[i:i + 3] + [f"...(+{j - i - 6} words)..."] + names[j - 3:j]
      i = j
    elif j > i:
      parts += names[i:j]
      i = j
    else:
      parts.append(names[i])
      i += 1
  return (f"{sample.task}: T={len(sample.prompt)} A={len(sample.answer)} evidence at {list(sample.evidence)}\n"
          f"  prompt: {' '.join(parts)}\n"
          f"  answer: {vocab.describe(sample.answer)}")
