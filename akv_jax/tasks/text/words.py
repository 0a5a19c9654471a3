"""Aggregation tasks in English: RULER's common words (cwe) and frequent words (fwe) extraction.

Templates and answer prefixes are RULER's (NVIDIA/RULER scripts/data/synthetic/constants.py), the generation rules
those of common_words_extraction.py and freq_words_extraction.py:

  cwe  a numbered list "1. w 2. w .." where num_cw common words appear freq_cw times each and every other word
       freq_ucw times (6 and 1 below 4096 tokens, as RULER does), after one solved example of the same template;
       words from wonderwords' nouns, adjectives and verbs, then (past ~100k tokens, where RULER switches to a
       bigger English word list) the plays' vocabulary. Answer: the common words.
  fwe  "coded text": random 6-letter words with Zipf counts floor(N k^-alpha / zeta(alpha)) for rank k, the top
       rank replaced by the dots "..." RULER tells the model to ignore. Answer: ranks 2-4.

The haystack grows by one distinct word (cwe) or one unit of N (fwe). Its order is fixed by sort keys drawn once
per sample, so a bigger haystack is the smaller one with entries inserted, and the token count grows steadily.
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from akv_jax.tasks.text import haystack as hay
from akv_jax.tasks.text.prompt import Parts, Plan, check_int, distinct

CWE_INSTRUCTION = ("Below is a numbered list of words. In these words, some appear more often than others. "
                   "Memorize the ones that appear most often.")
CWE_QUESTION = "Question: What are the {num_cw} most common words in the above list?"
CWE_ANSWER_PREFIX = " Answer: The top {num_cw} words that appear most often in the list are:"
FWE_INSTRUCTION = ("Read the following coded text and track the frequency of each coded word. Find the three most "
                   "frequently appeared coded words.")
FWE_QUESTION = ("Question: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
FWE_NOISE = "..."


def _numbered(words: list[str]) -> str:
  return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


@dataclasses.dataclass(frozen=True, kw_only=True)
class CommonWords:
  """RULER's cwe: which num_cw words of a numbered list appear most often.

  Attributes:
    name: task name.
    freq_cw, freq_ucw: repeats of each common and each uncommon word from `short_below` tokens on (30 and 3).
    num_cw: common words, the answer (10).
    short_below: below this length RULER's short settings apply: repeats 6 and 1, a smaller solved example.
  """

  name: str = "common_words"
  freq_cw: int = 30
  freq_ucw: int = 3
  num_cw: int = 10
  short_below: int = 4096
  metric: str = "all"
  max_new_tokens: int = 120  # RULER's tokens_to_generate for cwe

  def __post_init__(self):
    check_int("num_cw", self.num_cw, 1)
    check_int("freq_ucw", self.freq_ucw, 1)
    check_int("short_below", self.short_below, 0)
    if not isinstance(self.freq_cw, int) or self.freq_cw <= self.freq_ucw:
      raise ValueError(f"freq_cw={self.freq_cw!r} must be an int > freq_ucw={self.freq_ucw}")

  def _settings(self, length: int) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """((freq_cw, freq_ucw) of the task, (words, freq_cw, freq_ucw) of the solved example), as RULER picks them."""
    if length < self.short_below:
      return (6, 1), (2 * self.num_cw, 3, 1)
    return (self.freq_cw, self.freq_ucw), (4 * self.num_cw, 10, 3)

  def _text(self, words: list[str]) -> tuple[str, str, str]:
    return (CWE_INSTRUCTION + "\n" + _numbered(words), "\n" + CWE_QUESTION.format(num_cw=self.num_cw),
            CWE_ANSWER_PREFIX.format(num_cw=self.num_cw))

  def plan(self, rng: np.random.Generator, length: int) -> Plan:
    (f_cw, f_ucw), (shot_words, shot_cw, shot_ucw) = self._settings(length)
    pool = hay.common_word_pool()
    perm = rng.permutation(len(pool))
    # The solved example takes its words from the end of the permutation, the task from the start: no overlap.
    shot = [pool[i] for i in perm[len(pool) - shot_words:]]
    shot_list = shot[:self.num_cw] * shot_cw + shot[self.num_cw:] * shot_ucw
    shot_list = [shot_list[i] for i in rng.permutation(len(shot_list))]
    context, question, prefix = self._text(shot_list)
    shot_text = context + question + prefix + " " + _numbered(shot[:self.num_cw]) + "\n"  # RULER: one newline
    extra = hay.shakespeare_words()  # only reached past ~100k tokens
    words = [pool[i] for i in perm[:len(pool) - shot_words]] + [extra[i] for i in rng.permutation(len(extra))]
    repeats = np.asarray([f_cw] * self.num_cw + [f_ucw] * (len(words) - self.num_cw))
    owner = np.repeat(np.arange(len(words)), repeats)  # entry -> word index, grouped by word
    keys = rng.random(len(owner))
    outputs = tuple(words[:self.num_cw])

    def render(n: int) -> Parts:
      m = int(repeats[:n].sum())
      order = np.argsort(keys[:m], kind="stable")
      context, question, prefix = self._text([words[i] for i in owner[order]])
      return Parts(context=shot_text + context, question=question, answer_prefix=prefix, outputs=outputs, depth=None)

    return Plan(render=render, lo=self.num_cw + 1, hi=len(words))


def _zeta(alpha: float) -> float:
  """Riemann zeta(alpha) for alpha > 1 (Euler-Maclaurin after 64 terms; error far below 1e-12)."""
  k = 64
  head = sum(i**-alpha for i in range(1, k))
  return (head + k**(1 - alpha) / (alpha - 1) + k**-alpha / 2 + alpha * k**(-alpha - 1) / 12
          - alpha * (alpha + 1) * (alpha + 2) * k**(-alpha - 3) / 720)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FrequentWords:
  """RULER's fwe: the three most frequent words of a Zipf-distributed coded text.

  The haystack size N sets the counts floor(N k^-alpha / zeta(alpha)) of the word of rank k (rank 1 is "..."). The
  vocabulary has length // 50 words (RULER's rule, at least 5), and N starts where rank 4 is strictly more frequent
  than rank 5, so the answer is never tied.

  Attributes:
    name: task name.
    alpha: Zipf exponent, > 1 (2.0).
    coded_wordlen: letters per coded word (6).
  """

  name: str = "frequent_words"
  alpha: float = 2.0
  coded_wordlen: int = 6
  metric: str = "all"
  max_new_tokens: int = 50  # RULER's tokens_to_generate for fwe

  def __post_init__(self):
    if not isinstance(self.alpha, (int, float)) or isinstance(self.alpha, bool) or not self.alpha > 1:
      raise ValueError(f"alpha={self.alpha!r} must be a number > 1")
    check_int("coded_wordlen", self.coded_wordlen, 2)

  def counts(self, n: int, vocab_size: int) -> np.ndarray:
    """i64[vocab_size] occurrences of each rank's word at haystack size n."""
    ranks = np.arange(1, vocab_size + 1, dtype=np.float64)
    return np.floor(n * ranks**-self.alpha / _zeta(self.alpha) + 1e-9).astype(np.int64)

  def min_size(self, vocab_size: int) -> int:
    """Smallest N at which rank 4 appears strictly more often than rank 5."""
    n = 1
    while (c := self.counts(n, vocab_size))[3] <= c[4]:
      n += 1
    return n

  def plan(self, rng: np.random.Generator, length: int) -> Plan:
    vocab_size = max(5, length // 50)
    vocab = distinct(lambda k: ["".join(string.ascii_lowercase[i] for i in row)
                                 for row in rng.integers(26, size=(k, self.coded_wordlen)).tolist()], vocab_size)
    vocab[0] = FWE_NOISE
    # Every word has at least one token, so 2 * length + 64 words always overflow the length.
    hi = 2 * length + 64
    cap = self.counts(hi, vocab_size)
    keys = [rng.random(int(c)) for c in cap]

    def render(n: int) -> Parts:
      c = self.counts(n, vocab_size)
      owner = np.repeat(np.arange(vocab_size), c)
      order = np.argsort(np.concatenate([k[:int(m)] for k, m in zip(keys, c)]), kind="stable")
      text = " ".join(vocab[i] for i in owner[order])
      return Parts(context=FWE_INSTRUCTION + " " + text, question="\n" + FWE_QUESTION, answer_prefix=FWE_ANSWER_PREFIX,
                   outputs=tuple(vocab[1:4]), depth=None)

    return Plan(render=render, lo=self.min_size(vocab_size), hi=hi)
