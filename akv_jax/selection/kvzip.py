"""KVzip (Kim et al., 2025): keep the keys the model needs to reconstruct its context.

After the context is prefilled, the model is asked to repeat it ("Repeat the previous context exactly.", then the
context itself, in chunks), on top of the full cache. A key's score is the largest attention it receives from any
of those reconstruction queries (max over the G query heads of its kv head and over the queries), where each
query's softmax runs over the first `sinks` tokens, the chunk being reconstructed and the reconstruction tokens
before it. The scores are independent of any question, which is what makes KVzip the strongest query-agnostic
scorer of kvpress's benchmark; the price is the reconstruction pass, about 2-3x the prefill.

The pass runs the model, so this module only consumes its result: the scorer asks for votes of kind
"reconstruction" (`Needs.reconstruction`), and `akv_jax.models.prefill` / `prefill_many` compute them
(`akv_jax/models/reconstruction.py`) from a `models.Reconstruction` prompt. Tokens before the reconstructed
range (the chat header) get no votes, so only the policy's sink guard keeps them, as in kvpress.

Budgets: kvpress's default (layerwise=False) prunes the lowest scores across all layers and heads at once; here
the budget rule decides (the `kvzip` preset uses AdaKV's head-wise allocation within each layer).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from akv_jax.cache import DenseKV
from akv_jax.selection import common
from akv_jax.selection.base import Needs, Observations, Reconstruct, Scorer, register


@jax.jit
def kvzip_scores_from_votes(votes: jax.Array, kv: DenseKV) -> jax.Array:
  """KVzip scores from the reconstruction pass's votes f32[B, K, S] (max attention per key): f32[B, K, S], -inf
  at padded slots."""
  common.check_votes(votes, kv)
  return common.mask_invalid(votes.astype(jnp.float32), kv)


@register
@dataclasses.dataclass(frozen=True)
class KVzip(Scorer):
  """Max attention from a context-reconstruction pass.

  Attributes:
    chunk: context tokens reconstructed per pass (kvpress: 2048); the passes cost chunk x (cache + chunk) each.
    sinks: leading tokens inside every reconstruction query's softmax besides the chunk (kvpress: 4).
  """

  name = "kvzip"
  chunk: int = 2048
  sinks: int = 4

  def __post_init__(self):
    if not isinstance(self.chunk, int) or self.chunk < 1:
      raise ValueError(f"kvzip chunk={self.chunk!r} must be an int >= 1")
    if not isinstance(self.sinks, int) or self.sinks < 0:
      raise ValueError(f"kvzip sinks={self.sinks!r} must be an int >= 0")

  def needs(self, s: int) -> Needs:
    del s
    return Needs(votes="reconstruction", reconstruction=Reconstruct(chunk=self.chunk, sinks=self.sinks))

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    return kvzip_scores_from_votes(obs.votes, kv)
