"""Dense associative recall in the tasks' own format: training data for the lookup circuit, and its probe.

A stream is filler words with records  KEY k v..  and, for keys already seen, queries  QUERY k v.. EOS.
Multi-key and multi-query needles and variable tracking all need this lookup (answer with the record whose key
matches the query); single needles and multi-value needles do not, because every record there is an answer.
Every query's answer is supervised, so one stream carries many retrieval examples where a task prompt carries one.

Shapes: L stream length, Q queries in a stream.
"""

from __future__ import annotations

import numpy as np

from akv_jax.tasks.vocab import BOS, EOS, KEY, QUERY, Vocab


def recall_stream(rng: np.random.Generator, length: int, vocab: Vocab, n_pairs: int) -> tuple[np.ndarray, np.ndarray]:
  """One stream of `length` tokens over `n_pairs` distinct keys (each with 1-3 distinct value ids).

  Returns tokens i32[L] and the loss mask bool[L] (True on answer tokens, as ruler.training_sequence).
  """
  keys = rng.choice(np.asarray(vocab.key_ids), n_pairs, replace=False)
  vals = [rng.choice(np.asarray(vocab.value_ids), int(rng.integers(1, 4)), replace=False) for _ in range(n_pairs)]
  words = np.asarray(vocab.word_ids)
  toks, mask, seen = [BOS], [False], 0
  while len(toks) < length:
    r = rng.random()
    if r < 0.12 and seen < n_pairs:
      rec = [KEY, int(keys[seen]), *map(int, vals[seen])]
      toks += rec
      mask += [False] * len(rec)
      seen += 1
    elif r < 0.3 and seen:
      i = int(rng.integers(seen))
      ans = [*map(int, vals[i]), EOS]
      toks += [QUERY, int(keys[i]), *ans]
      mask += [False] * 2 + [True] * len(ans)
    else:
      toks.append(int(rng.choice(words)))
      mask.append(False)
  return np.asarray(toks[:length], np.int32), np.asarray(mask[:length], bool)


def recall_queries(tokens: np.ndarray) -> dict[str, np.ndarray]:
  """The queries of one stream tokens i32[L] whose first answer token is inside it, with what a model that
  ignores the queried key could answer.

  Returns:
    position: i32[Q], each query's key (a model's prediction there is its first answer token);
    truth: i32[Q], the queried record's first value;
    latest: i32[Q], the first value of the most recent record (the answer of a model that ignores the key);
    seen: i32[Q], records seen so far (a uniform guess among them is right 1 / seen of the time).
  """
  firsts = []   # first value of each record, in order
  out = {"position": [], "truth": [], "latest": [], "seen": []}
  for i in range(len(tokens) - 1):
    if tokens[i] == KEY and i + 2 < len(tokens):
      firsts.append(int(tokens[i + 2]))
    elif tokens[i] == QUERY and firsts and i + 2 < len(tokens):
      out["position"].append(i + 1)
      out["truth"].append(int(tokens[i + 2]))
      out["latest"].append(firsts[-1])
      out["seen"].append(len(firsts))
  return {k: np.asarray(v, np.int32) for k, v in out.items()}
