"""Dense counting in the tasks' own format: training data for ranking words by frequency.

A word-frequency prompt (common_words, frequent_words) carries one supervised answer, its top words, after
thousands of body tokens. A counting stream is such a body with a query after every few words:
  BOS <marker> w w .. QUERY a1 a2 a3 EOS w w .. QUERY a1 a2 a3 EOS ..
each answer ranking the words seen so far in the stream (answers included: they are tokens the model reads), so
one stream supervises the ranking at many prefix lengths, as recall streams (tasks.recall) do for the lookup.
A query whose prefix has ties among its top counts is left out, so every answer is unique, as in the tasks.

Shapes: L stream length.
"""

from __future__ import annotations

import numpy as np

from akv_jax.tasks import ruler
from akv_jax.tasks.vocab import BOS, EOS, QUERY, Vocab

COUNTING_TASKS = ("common_words", "frequent_words")


def count_stream(rng: np.random.Generator, length: int, vocab: Vocab, task: str, every: int = 32
                 ) -> tuple[np.ndarray, np.ndarray]:
  """One stream of `length` tokens: `task`'s body (its word distribution) with a query after every `every` words.

  The body is the task's own body for a prompt of 2 * `length` tokens (`task.generate`), read from the start, so
  each prefix has the task's word distribution and the stream never runs out of words; it is cut at `length`.

  Returns tokens i32[L] and the loss mask bool[L] (True on answer tokens and their EOS, as
  ruler.training_sequence).
  """
  if task not in COUNTING_TASKS:
    raise ValueError(f"task={task!r} is not a counting task; choose one of {', '.join(COUNTING_TASKS)}")
  if not isinstance(every, int) or every < 1:
    raise ValueError(f"every={every!r} must be an int >= 1")
  spec = ruler.get_task(task)
  top = spec.max_answer_length() - 1
  body = spec.generate(rng, 2 * length, vocab).prompt[2:-1]   # BOS marker body QUERY -> the body
  toks, mask = [BOS, vocab.task_id(task)], [False, False]
  counts = np.zeros(vocab.size, np.int64)
  for i, w in enumerate(body):
    if len(toks) >= length:
      break
    toks.append(int(w))
    mask.append(False)
    counts[w] += 1
    if (i + 1) % every:
      continue
    order = np.argsort(-counts, kind="stable")[:top + 1]
    if np.all(np.diff(counts[order]) < 0):
      answer = order[:top]
      counts[answer] += 1
      toks += [QUERY, *map(int, answer), EOS]
      mask += [False] + [True] * (top + 1)
  return np.asarray(toks[:length], np.int32), np.asarray(mask[:length], bool)
