"""Retrieval tasks in English: RULER's needle-in-a-haystack family and variable tracking.

Templates, needles and answer prefixes are RULER's (NVIDIA/RULER scripts/data/synthetic/constants.py, niah.py and
variable_tracking.py), including the rewrite niah.py applies when one number is asked for (Some -> A, are -> is,
numbers -> number). Needle keys are wonderwords "adjective-noun" pairs, values 7-digit numbers; variable names are
5 capital letters and the chain's value a 5-digit number, as RULER draws them.

Haystacks: "noise" repeats RULER's noise sentence, one per line, needles on lines of their own at uniform random
positions (RULER's noise haystack). "shakespeare" takes the place of RULER's Paul Graham essays: consecutive lines
of the plays from a random speech onward, needles at depths drawn without replacement from RULER's 40 evenly
spaced depths (0, 3, 5, .., 100 percent), each on a line of its own (RULER splits essays into sentences instead).
"""

from __future__ import annotations

import dataclasses
import string

import numpy as np

from akv_jax.tasks.text import haystack as hay
from akv_jax.tasks.text.prompt import Parts, Plan, check_int, distinct

HAYSTACKS = ("noise", "shakespeare")
# RULER's needle depths in percent: np.round(np.linspace(0, 100, 40)).
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40)))

# Noise repeats and Shakespeare wraps around, so neither haystack runs out.
_UNBOUNDED = 10**9

NEEDLE = "One of the special magic numbers for {key} is: {value}."
# niah, as RULER's constants.py writes it (several numbers asked for) and as niah.py rewrites it for one.
NIAH_MANY = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
             "quiz you about the numbers afterwards.",
             "What are all the special magic numbers for {query} mentioned in the provided text?",
             " The special magic numbers for {query} mentioned in the provided text are")
NIAH_ONE = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
            "about the number afterwards.",
            "What is the special magic number for {query} mentioned in the provided text?",
            " The special magic number for {query} mentioned in the provided text is")
VT_INSTRUCTION = "Memorize and track the chain(s) of variable assignment hidden in the following text."
VT_QUESTION = "Question: Find all variables that are assigned the value {query} in the text above."
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables "
                    "are assigned the value {query}, they are: ")


def _keys(rng: np.random.Generator, count: int) -> list[str]:
  adjs, nouns = hay.adjectives(), hay.nouns()
  pairs = distinct(lambda k: zip(rng.integers(len(adjs), size=k).tolist(),
                                  rng.integers(len(nouns), size=k).tolist()), count)
  return [f"{adjs[a]}-{nouns[n]}" for a, n in pairs]


def _numbers(rng: np.random.Generator, count: int, digits: int) -> list[str]:
  return [str(v) for v in distinct(lambda k: rng.integers(10**(digits - 1), 10**digits, size=k).tolist(), count)]


def _letters(rng: np.random.Generator, count: int, size: int) -> list[str]:
  return distinct(lambda k: ["".join(string.ascii_uppercase[i] for i in row)
                              for row in rng.integers(26, size=(k, size)).tolist()], count)


def _noise_positions(fractions: np.ndarray, n: int) -> list[int]:
  """Insertion points (before unit i) for fractions in [0, 1): uniform over the n noise units, as RULER's sample."""
  return [min(int(u * n), n - 1) for u in fractions]


@dataclasses.dataclass(frozen=True, kw_only=True)
class NeedleTask:
  """RULER's niah: needles "One of the special magic numbers for <key> is: <value>." in a haystack.

  num_keys keys with num_values values each, one needle per value, and num_queries of the keys asked for (RULER's
  num_needle_k, num_needle_v, num_needle_q); the answer is every value of the asked keys, in the order asked.
  Needles appear in random order; keys and values are distinct within a sample.

  Attributes:
    name: task name (a key of `TASKS`).
    haystack: "noise" or "shakespeare".
    num_keys, num_values, num_queries: as above; num_queries <= num_keys.
  """

  name: str
  haystack: str
  num_keys: int = 1
  num_values: int = 1
  num_queries: int = 1
  metric: str = "all"
  max_new_tokens: int = 128  # RULER's tokens_to_generate for niah

  def __post_init__(self):
    if self.haystack not in HAYSTACKS:
      raise ValueError(f"haystack={self.haystack!r} must be one of {', '.join(HAYSTACKS)}")
    for field in ("num_keys", "num_values", "num_queries"):
      check_int(field, getattr(self, field), 1)
    if self.num_queries > self.num_keys:
      raise ValueError(f"num_queries={self.num_queries} must be <= num_keys={self.num_keys}")
    if self.haystack == "shakespeare" and self.num_keys * self.num_values > len(DEPTHS):
      raise ValueError(f"num_keys * num_values={self.num_keys * self.num_values} needles do not fit the "
                       f"{len(DEPTHS)} depths of the shakespeare haystack")

  def plan(self, rng: np.random.Generator, length: int) -> Plan:
    del length  # the template does not change with the length
    keys = _keys(rng, self.num_keys)
    values = _numbers(rng, self.num_keys * self.num_values, 7)
    needles = [(k, NEEDLE.format(key=keys[k], value=values[k * self.num_values + j]))
               for k in range(self.num_keys) for j in range(self.num_values)]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    asked = rng.permutation(self.num_keys)[:self.num_queries].tolist()
    names = [keys[k] for k in asked]
    query = names[0] if len(names) == 1 else ", ".join(names[:-1]) + ", and " + names[-1]
    outputs = tuple(values[k * self.num_values + j] for k in asked for j in range(self.num_values))
    instruction, question, prefix = NIAH_ONE if self.num_queries * self.num_values == 1 else NIAH_MANY
    if self.haystack == "noise":
      fractions = np.sort(rng.random(len(needles)))
      lines = None
    else:
      fractions = np.sort(rng.choice(np.asarray(DEPTHS), size=len(needles), replace=False)) / 100
      lines, starts = hay.shakespeare_lines(), hay.speech_starts()
      offset = starts[int(rng.integers(len(starts)))]

    def render(n: int) -> Parts:
      if lines is None:
        units, pos = [hay.NOISE] * n, _noise_positions(fractions, n)
      else:
        units = [lines[(offset + i) % len(lines)] for i in range(n)]
        pos = [int(n * f + 1e-9) for f in fractions]  # RULER: int(len(sentences) * depth / 100)
      body = hay.insert_lines(units, [(p, text) for p, (_, text) in zip(pos, needles)])
      depth = min(p for p, (k, _) in zip(pos, needles) if k in asked) / n
      return Parts(context=instruction + "\n" + "\n".join(body), question="\n" + question.format(query=query),
                   answer_prefix=prefix.format(query=query), outputs=outputs, depth=depth)

    return Plan(render=render, lo=1, hi=_UNBOUNDED)


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariableTracking:
  """RULER's vt: chains  VAR A = 12345, VAR B = VAR A, ..  hidden among noise lines; name every variable of one.

  Each of num_chains chains has num_hops + 1 statements in order at uniform random lines; the first chain's value is
  asked for and its num_hops + 1 variable names answer. With `fewshot` the user turn starts, as RULER's does, with
  one solved example: the same template over `icl_noises` noise lines with 3-letter names, then its answer.

  Attributes:
    name: task name.
    num_chains, num_hops: RULER's chain count and hops per chain (1 and 4 in RULER's vt).
    fewshot: prepend RULER's solved example.
    icl_noises: noise lines of that example (RULER sizes it to 500 tokens, about 16 lines on Llama's tokenizer).
  """

  name: str = "variable_tracking"
  num_chains: int = 1
  num_hops: int = 4
  fewshot: bool = True
  icl_noises: int = 16
  metric: str = "all"
  max_new_tokens: int = 30  # RULER's tokens_to_generate for vt

  def __post_init__(self):
    check_int("num_chains", self.num_chains, 1)
    check_int("num_hops", self.num_hops, 1)
    check_int("icl_noises", self.icl_noises, 1)

  def _chains(self, rng: np.random.Generator, letters: int) -> tuple[list[list[str]], list[list[str]], str]:
    """(names per chain, statements per chain, the first chain's value)."""
    m = self.num_hops + 1
    names = _letters(rng, self.num_chains * m, letters)
    values = _numbers(rng, self.num_chains, 5)
    chains, statements = [names[c * m:(c + 1) * m] for c in range(self.num_chains)], []
    for chain, value in zip(chains, values):
      # RULER's statements, trailing space included.
      statements.append([f"VAR {chain[0]} = {value}"] + [f"VAR {chain[j + 1]} = VAR {chain[j]} " for j in range(m - 1)])
    return chains, statements, values[0]

  def _body(self, statements: list[list[str]], fractions: np.ndarray, n: int) -> tuple[list[str], int]:
    """Noise lines with the chains inserted in order; also the first statement's insertion point."""
    inserts = []
    for c, chain in enumerate(statements):
      for j, (p, text) in enumerate(zip(_noise_positions(fractions[c], n), chain)):
        inserts.append((p, c, j, text))
    inserts.sort()
    first = next(p for p, c, j, _ in inserts if c == 0 and j == 0)
    return hay.insert_lines([hay.NOISE] * n, [(p, t) for p, _, _, t in inserts]), first

  def _text(self, body: list[str], value: str) -> tuple[str, str, str]:
    return (VT_INSTRUCTION + "\n\n" + "\n".join(body), "\n" + VT_QUESTION.format(query=value),
            VT_ANSWER_PREFIX.format(num_v=self.num_hops + 1, query=value))

  def plan(self, rng: np.random.Generator, length: int) -> Plan:
    del length
    m = self.num_hops + 1
    shot = ""
    if self.fewshot:
      names, statements, value = self._chains(rng, 3)
      body, _ = self._body(statements, np.sort(rng.random((self.num_chains, m)), axis=1), self.icl_noises)
      context, question, prefix = self._text(body, value)
      shot = context + question + prefix + " ".join(names[0]) + "\n\n"  # RULER: example + "\n", then "\n"
    names, statements, value = self._chains(rng, 5)
    fractions = np.sort(rng.random((self.num_chains, m)), axis=1)

    def render(n: int) -> Parts:
      body, first = self._body(statements, fractions, n)
      context, question, prefix = self._text(body, value)
      return Parts(context=shot + context, question=question, answer_prefix=prefix, outputs=tuple(names[0]),
                   depth=first / n)

    return Plan(render=render, lo=1, hi=_UNBOUNDED)
