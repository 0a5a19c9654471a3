"""Needle-in-a-haystack tasks (RULER's NIAH family) over random-word haystacks.

A needle is the record  KEY k v1 .. vm  (m drawn per needle from `value_len`). Every key in a sample is distinct,
and so is every value id, so an answer group names exactly one needle.

  niah_single       1 needle;                     QUERY k               -> v1..vm EOS
  niah_multikey     4 needles, distinct keys;     QUERY k               -> the queried needle's values EOS
  niah_multivalue   4 needles sharing one key;    QUERY k               -> g1 SEP g2 SEP g3 SEP g4 EOS
  niah_multiquery   4 needles, distinct keys;     QUERY ka kb (kc kd)   -> the queried needles' groups,
                    2-4 keys queried, in random order                  SEP-separated, EOS
  Answer groups are listed in order of appearance in the prompt.

Scores: niah_multivalue and niah_multiquery are group recall (`base.recall` over SEP-separated groups): every
group must be there, in any order, as RULER scores its multi-value and multi-query tasks (all references in the
output); niah_single and niah_multikey are exact match.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from akv_jax.tasks import base
from akv_jax.tasks.vocab import KEY, Vocab


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeedleTask:
  """A NIAH variant.

  Attributes:
    name: task name (must have a marker in the vocab).
    num_needles: needles in the haystack.
    num_queries: inclusive range of keys queried per sample (distinct needles, random order); more than
      one is scored as group recall.
    shared_key: every needle carries the same key and the one query asks for all their values (multivalue).
    value_len: inclusive range of value ids per needle.
  """

  name: str
  num_needles: int = 1
  num_queries: tuple[int, int] = (1, 1)
  shared_key: bool = False
  value_len: tuple[int, int] = (2, 4)

  def __post_init__(self):
    if not isinstance(self.num_needles, int) or self.num_needles < 1:
      raise ValueError(f"num_needles={self.num_needles!r} must be an int >= 1")
    base.check_range("num_queries", self.num_queries, 1)
    base.check_range("value_len", self.value_len, 1)
    if self.shared_key and self.num_queries != (1, 1):
      raise ValueError(f"num_queries={self.num_queries} must be (1, 1) with shared_key: there is one key")
    if self.num_queries[1] > self.num_needles:
      raise ValueError(f"num_queries={self.num_queries} asks for more keys than num_needles={self.num_needles}")

  def min_length(self, vocab: Vocab) -> int:
    # Worst case: every needle at the longest value, the most queries, no filler left.
    return base.FRAME_TOKENS + self.num_needles * (2 + self.value_len[1]) + self.num_queries[1]

  def max_answer_length(self) -> int:
    groups = self.num_needles if self.shared_key else self.num_queries[1]
    return groups * (self.value_len[1] + 1)  # values plus a SEP or the EOS per group

  def generate(self, rng: np.random.Generator, length: int, vocab: Vocab) -> base.Sample:
    base.check_length(self, length, vocab)
    n = self.num_needles
    n_keys = 1 if self.shared_key else n
    base.check_supply(self.name, "num_keys", vocab.num_keys, n_keys)
    base.check_supply(self.name, "num_values", vocab.num_values, n * self.value_len[1])

    keys = vocab.key_ids.start + rng.choice(vocab.num_keys, n_keys, replace=False)
    lens = rng.integers(self.value_len[0], self.value_len[1] + 1, size=n)
    values = vocab.value_ids.start + rng.choice(vocab.num_values, int(lens.sum()), replace=False)
    groups = np.split(values, np.cumsum(lens)[:-1])
    needle_keys = np.repeat(keys, n) if self.shared_key else keys
    records = [[KEY, int(k), *g.tolist()] for k, g in zip(needle_keys, groups)]

    if self.shared_key:
      query, chosen = [int(keys[0])], list(range(n))
    else:
      q = int(rng.integers(self.num_queries[0], self.num_queries[1] + 1))
      chosen = rng.choice(n, q, replace=False).tolist()
      query = [int(keys[i]) for i in chosen]

    body_len = length - base.FRAME_TOKENS - len(query)
    body, starts = base.haystack(rng, vocab, body_len, records)
    prompt = base.assemble(vocab, self.name, body, query)
    # Records sit in the body in needle order, so sorted needle indices list the answer groups in prompt order.
    answer = base.with_eos(base.join_groups([groups[i] for i in sorted(chosen)]))
    evidence = tuple(2 + starts[i] for i in sorted(chosen))
    return base.Sample(prompt=prompt, answer=answer, task=self.name, evidence=evidence)

  def score(self, prediction: Sequence[int], sample: base.Sample) -> float:
    predicted = base.split_groups(base.until_eos(prediction))
    expected = base.split_groups(sample.answer[:-1].tolist())
    if self.shared_key or self.num_queries[1] > 1:
      return base.recall(predicted, expected)
    return base.ordered_match(predicted, expected)


NIAH_SINGLE = NeedleTask(name="niah_single")
NIAH_MULTIKEY = NeedleTask(name="niah_multikey", num_needles=4)
NIAH_MULTIVALUE = NeedleTask(name="niah_multivalue", num_needles=4, shared_key=True, value_len=(1, 3))
NIAH_MULTIQUERY = NeedleTask(name="niah_multiquery", num_needles=4, num_queries=(2, 4), value_len=(1, 3))
