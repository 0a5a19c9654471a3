"""What every task shares: the Sample record, the Task protocol, prompt assembly, haystack filling, scoring rules.

A prompt is always  BOS <task marker> body QUERY query...  and its answer  answer... EOS  follows the query
directly (see akv_jax.tasks.vocab for why there is no marker between them).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, Sequence

import numpy as np

from akv_jax.tasks.vocab import BOS, EOS, QUERY, SEP, Vocab

# Prompt tokens that are not body: BOS, the task marker and QUERY (query content is counted per task).
FRAME_TOKENS = 3


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
  """One generated example.

  Attributes:
    prompt: i32[T], BOS first and the query last, exactly the requested length.
    answer: i32[A], the tokens a perfect model generates after the prompt, EOS last.
    task: name of the task that made it (a key of `TASKS`).
    evidence: prompt positions where the records the answer reads start (needles, chain statements), in
      answer order; empty for the word-frequency tasks, whose answer depends on the whole body.
  """

  prompt: np.ndarray
  answer: np.ndarray
  task: str
  evidence: tuple[int, ...] = ()


class Task(Protocol):
  """A task: draws samples of an exact length and scores predictions with its own rule."""

  name: str

  def min_length(self, vocab: Vocab) -> int:
    """Shortest prompt `generate` accepts."""

  def max_answer_length(self) -> int:
    """Most answer tokens (EOS included) a sample can have: the decode steps a scorer needs."""

  def generate(self, rng: np.random.Generator, length: int, vocab: Vocab) -> Sample:
    """A sample whose prompt has exactly `length` tokens."""

  def score(self, prediction: Sequence[int], sample: Sample) -> float:
    """Score in [0, 1] of generated ids [A'] (read up to the first EOS) against the sample's answer."""


def check_length(task: Task, length: int, vocab: Vocab) -> None:
  if not isinstance(length, (int, np.integer)) or isinstance(length, bool):
    raise ValueError(f"length={length!r} must be an int")
  need = task.min_length(vocab)
  if length < need:
    raise ValueError(f"length={length} is too short for {task.name}: its records and query need at least "
                     f"{need} tokens")


def check_supply(task_name: str, field: str, have: int, need: int) -> None:
  """Raise when the vocab has fewer distinct ids of a kind than one sample draws without replacement."""
  if have < need:
    raise ValueError(f"{field}={have} is too small for {task_name}: one sample draws up to {need} distinct ids")


def check_range(name: str, value: tuple[int, int], low: int) -> None:
  """Validate an inclusive (lo, hi) knob."""
  if (not isinstance(value, tuple) or len(value) != 2 or not all(isinstance(v, int) for v in value)
      or not low <= value[0] <= value[1]):
    raise ValueError(f"{name}={value!r} must be a tuple (lo, hi) of ints with {low} <= lo <= hi")


def assemble(vocab: Vocab, task: str, body: np.ndarray, query: Sequence[int]) -> np.ndarray:
  """BOS marker body QUERY query -> i32[T]."""
  head = np.asarray([BOS, vocab.task_id(task)], np.int32)
  tail = np.asarray([QUERY, *query], np.int32)
  return np.concatenate([head, np.asarray(body, np.int32), tail])


def with_eos(tokens: Sequence[int]) -> np.ndarray:
  return np.asarray([*tokens, EOS], np.int32)


def join_groups(groups: Sequence[Sequence[int]]) -> list[int]:
  """Groups joined by SEP: [[a, b], [c]] -> [a, b, SEP, c]."""
  out: list[int] = []
  for i, g in enumerate(groups):
    if i:
      out.append(SEP)
    out.extend(int(t) for t in g)
  return out


def haystack(rng: np.random.Generator, vocab: Vocab, body_len: int,
             records: Sequence[Sequence[int]]) -> tuple[np.ndarray, list[int]]:
  """Uniform random words with `records` inserted, in order, at uniform random depths.

  Returns the body i32[body_len] and the body offset where each record starts. Records may sit next to each
  other; words are disjoint from every record id, so they still parse apart.
  """
  n_fill = body_len - sum(len(r) for r in records)
  if n_fill < 0:
    raise ValueError(f"body_len={body_len} cannot hold records of {body_len - n_fill} tokens")
  fill = rng.integers(vocab.word_ids.start, vocab.word_ids.stop, size=n_fill, dtype=np.int32)
  cuts = np.sort(rng.integers(0, n_fill + 1, size=len(records)))
  parts, starts, prev, offset = [], [], 0, 0
  for cut, rec in zip(cuts, records):
    parts.append(fill[prev:cut])
    offset += cut - prev
    starts.append(int(offset))
    parts.append(np.asarray(rec, np.int32))
    offset += len(rec)
    prev = cut
  parts.append(fill[prev:])
  return np.concatenate(parts).astype(np.int32), starts


def until_eos(prediction: Sequence[int]) -> list[int]:
  """Generated ids [A'] up to (without) the first EOS; everything after it, padding included, is ignored."""
  pred = np.asarray(prediction)
  if pred.ndim != 1:
    raise ValueError(f"prediction has shape {pred.shape}; expected one row [A]")
  out = []
  for t in pred.tolist():
    if t == EOS:
      break
    out.append(int(t))
  return out


def split_groups(tokens: Sequence[int]) -> list[tuple[int, ...]]:
  """[a, b, SEP, c] -> [(a, b), (c,)]; an empty sequence has no groups."""
  if not len(tokens):
    return []
  groups, cur = [], []
  for t in tokens:
    if t == SEP:
      groups.append(tuple(cur))
      cur = []
    else:
      cur.append(int(t))
  groups.append(tuple(cur))
  return groups


def ordered_match(predicted: Sequence, expected: Sequence) -> float:
  """Fraction of positions i where predicted[i] == expected[i] (missing predictions count as wrong)."""
  return sum(i < len(predicted) and predicted[i] == e for i, e in enumerate(expected)) / len(expected)


def recall(predicted: Sequence, expected: Sequence) -> float:
  """Fraction of expected items found among the first len(expected) predicted items, in any order.

  Reading only as many predictions as there are expected items means listing every candidate earns nothing.
  """
  head = set(predicted[:len(expected)])
  return sum(e in head for e in expected) / len(expected)
