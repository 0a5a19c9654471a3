"""Variable tracking (RULER's multi-hop tracing): follow assignment chains through a random-word haystack.

A chain of n variables x1..xn (key ids) bound to a value id v is the n statements  VAR source target,  read
"target takes the value of source":

  VAR v x1    VAR x1 x2    ...    VAR x(n-1) xn

each 3 tokens, placed at random depths with a chain's statements in chain order; chains interleave. Every
variable and every chain value in a sample is distinct. The prompt queries the first chain's value:

  QUERY v  ->  x1 x2 .. xn EOS

i.e. every variable whose value resolves to v, in chain order, which is also their order of appearance. Each hop
reads the id right after the previous answer's id in a statement (a one-back copy; see akv_jax.tasks.vocab).
The other chains are distractors. Score: recall (`base.recall`) of the variables.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from akv_jax.tasks import base
from akv_jax.tasks.vocab import VAR, Vocab


@dataclasses.dataclass(frozen=True, kw_only=True)
class VariableTracking:
  """Attributes:
    name: task name (must have a marker in the vocab).
    num_chains: chains per sample; one is queried, the rest are distractors.
    chain_len: inclusive range of variables per chain (hops, counting the binding to the value).
  """

  name: str = "variable_tracking"
  num_chains: int = 2
  chain_len: tuple[int, int] = (2, 4)

  def __post_init__(self):
    if not isinstance(self.num_chains, int) or self.num_chains < 1:
      raise ValueError(f"num_chains={self.num_chains!r} must be an int >= 1")
    base.check_range("chain_len", self.chain_len, 1)

  def min_length(self, vocab: Vocab) -> int:
    return base.FRAME_TOKENS + 3 * self.num_chains * self.chain_len[1] + 1

  def max_answer_length(self) -> int:
    return self.chain_len[1] + 1

  def generate(self, rng: np.random.Generator, length: int, vocab: Vocab) -> base.Sample:
    base.check_length(self, length, vocab)
    base.check_supply(self.name, "num_keys", vocab.num_keys, self.num_chains * self.chain_len[1])
    base.check_supply(self.name, "num_values", vocab.num_values, self.num_chains)

    lens = rng.integers(self.chain_len[0], self.chain_len[1] + 1, size=self.num_chains)
    names = vocab.key_ids.start + rng.choice(vocab.num_keys, int(lens.sum()), replace=False)
    chains = np.split(names, np.cumsum(lens)[:-1])
    values = vocab.value_ids.start + rng.choice(vocab.num_values, self.num_chains, replace=False)

    # A random interleaving that keeps each chain's statements in chain order: the j-th time chain c comes up
    # in the shuffled multiset, its j-th statement goes there.
    order = rng.permutation(np.repeat(np.arange(self.num_chains), lens))
    taken = np.zeros(self.num_chains, int)
    records, owner = [], []
    for c in order.tolist():
      j = taken[c]
      source = values[c] if j == 0 else chains[c][j - 1]
      records.append([VAR, int(source), int(chains[c][j])])
      owner.append(c)
      taken[c] += 1

    body_len = length - base.FRAME_TOKENS - 1
    body, starts = base.haystack(rng, vocab, body_len, records)
    prompt = base.assemble(vocab, self.name, body, [int(values[0])])
    answer = base.with_eos(chains[0].tolist())
    evidence = tuple(2 + s for s, c in zip(starts, owner) if c == 0)
    return base.Sample(prompt=prompt, answer=answer, task=self.name, evidence=evidence)

  def score(self, prediction: Sequence[int], sample: base.Sample) -> float:
    return base.recall(base.until_eos(prediction), sample.answer[:-1].tolist())


VARIABLE_TRACKING = VariableTracking()
