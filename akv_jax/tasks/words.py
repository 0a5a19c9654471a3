"""Aggregation tasks (RULER's CWE and FWE): the body is a word stream and the answer is its most frequent words.

Both prompts are  BOS <marker> w.. w.. (the whole body) QUERY  and answers list the top words in
descending frequency, EOS last. Ties cannot happen: the counts of the answered words are strictly decreasing and
strictly above every other word's count, by construction (cwe) or by rejection (fwe). Score: recall
(`base.recall`) of the answered words.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from akv_jax.tasks import base
from akv_jax.tasks.vocab import Vocab


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonWords:
  """Common words extraction: a few words repeated many times among many rare words.

  The body of Lb tokens gives the `num_common` = k common words counts u * (k+1, k, ..., 2), where
  u = floor(floor(common_frac * Lb) / (2 + 3 + .. + (k+1))), so their counts are fixed ratios apart. Every other
  word appears between 1 and u times (at most half the least common word's count); the rest of the body is
  spread over them at random. At length 64 that is counts 4, 3, 2 against 51 words seen once; at 2048, 136, 102,
  68 against 253 words seen about 7 times each.

  Attributes:
    name: task name (must have a marker in the vocab).
    num_common: k, the words answered.
    common_frac: share of the body the common words take up (before rounding down).
  """

  name: str = "common_words"
  num_common: int = 3
  common_frac: float = 0.15

  def __post_init__(self):
    if not isinstance(self.num_common, int) or self.num_common < 1:
      raise ValueError(f"num_common={self.num_common!r} must be an int >= 1")
    if not 0.0 < self.common_frac < 1.0:
      raise ValueError(f"common_frac={self.common_frac!r} must be in (0, 1)")

  def _weights(self) -> np.ndarray:
    return np.arange(self.num_common + 1, 1, -1)

  def _unit(self, body_len: int) -> int:
    return int(self.common_frac * body_len) // int(self._weights().sum())

  def min_length(self, vocab: Vocab) -> int:
    body = int(self._weights().sum() / self.common_frac) - 1
    while self._unit(body) < 1:
      body += 1
    return base.FRAME_TOKENS + body

  def max_answer_length(self) -> int:
    return self.num_common + 1

  def generate(self, rng: np.random.Generator, length: int, vocab: Vocab) -> base.Sample:
    base.check_length(self, length, vocab)
    k = self.num_common
    base.check_supply(self.name, "num_words", vocab.num_words, k)
    body_len = length - base.FRAME_TOKENS
    unit = self._unit(body_len)
    freqs = unit * self._weights()
    rest, pool = body_len - int(freqs.sum()), vocab.num_words - k
    if rest > pool * unit:
      raise ValueError(f"num_words={vocab.num_words} is too small for {self.name} at length={length}: "
                       f"{rest} rare-word tokens do not fit {pool} rare words at most {unit} times each")

    words = rng.permutation(vocab.num_words)
    if rest <= pool:
      rare, counts = words[k:k + rest], np.ones(rest, int)
    else:
      # Each rare word appears once, plus extra occurrences drawn without replacement from u - 1 slots per
      # word, which caps every rare count at u exactly.
      extra = rng.choice(pool * (unit - 1), rest - pool, replace=False) // (unit - 1)
      rare, counts = words[k:], 1 + np.bincount(extra, minlength=pool)
    stream = np.repeat(np.concatenate([words[:k], rare]), np.concatenate([freqs, counts]))
    body = vocab.word_ids.start + rng.permutation(stream)
    prompt = base.assemble(vocab, self.name, body, [])
    answer = base.with_eos((vocab.word_ids.start + words[:k]).tolist())
    return base.Sample(prompt=prompt, answer=answer, task=self.name)

  def score(self, prediction: Sequence[int], sample: base.Sample) -> float:
    return base.recall(base.until_eos(prediction), sample.answer[:-1].tolist())


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrequentWords:
  """Frequent words extraction: i.i.d. words from a Zipf law; answer the `num_top` most frequent.

  Word of rank r (ranks assigned to word ids at random per sample) has probability proportional to r^-alpha over
  all num_words words. A draw whose top num_top + 1 counts are not strictly decreasing is redrawn, so the answer
  and its order are unique.

  Attributes:
    name: task name (must have a marker in the vocab).
    num_top: words answered.
    alpha: Zipf exponent (RULER uses 2; 1.5 keeps the third word at a few percent of the stream).
    max_tries: redraws before giving up with ValueError.
  """

  name: str = "frequent_words"
  num_top: int = 3
  alpha: float = 1.5
  max_tries: int = 1000

  def __post_init__(self):
    if not isinstance(self.num_top, int) or self.num_top < 1:
      raise ValueError(f"num_top={self.num_top!r} must be an int >= 1")
    if not self.alpha > 0.0:
      raise ValueError(f"alpha={self.alpha!r} must be > 0")
    if not isinstance(self.max_tries, int) or self.max_tries < 1:
      raise ValueError(f"max_tries={self.max_tries!r} must be an int >= 1")

  def min_length(self, vocab: Vocab) -> int:
    # Strict counts need at least 1 + 2 + .. + num_top tokens; four times that keeps redraws to a handful.
    return base.FRAME_TOKENS + 4 * self.num_top * (self.num_top + 1) // 2

  def max_answer_length(self) -> int:
    return self.num_top + 1

  def generate(self, rng: np.random.Generator, length: int, vocab: Vocab) -> base.Sample:
    base.check_length(self, length, vocab)
    k = self.num_top
    base.check_supply(self.name, "num_words", vocab.num_words, k + 1)
    body_len = length - base.FRAME_TOKENS
    p = np.arange(1, vocab.num_words + 1, dtype=np.float64) ** -self.alpha
    p /= p.sum()
    for _ in range(self.max_tries):
      counts = rng.multinomial(body_len, p)
      top = np.sort(counts)[::-1][:k + 1]
      if np.all(np.diff(top) < 0):
        break
    else:
      raise ValueError(f"length={length} gave ties among the top {k + 1} word counts in {self.max_tries} draws; "
                       f"use a longer length or a larger alpha than {self.alpha}")
    words = rng.permutation(vocab.num_words)
    body = vocab.word_ids.start + rng.permutation(np.repeat(words, counts))
    prompt = base.assemble(vocab, self.name, body, [])
    ranked = np.argsort(-counts, kind="stable")[:k]
    answer = base.with_eos((vocab.word_ids.start + words[ranked]).tolist())
    return base.Sample(prompt=prompt, answer=answer, task=self.name)

  def score(self, prediction: Sequence[int], sample: base.Sample) -> float:
    return base.recall(base.until_eos(prediction), sample.answer[:-1].tolist())


COMMON_WORDS = CommonWords()
FREQUENT_WORDS = FrequentWords()
