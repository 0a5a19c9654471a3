"""TOVA (Oren et al., 2024): keys ranked by the attention of the most recent query."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from akv_jax.cache import DenseKV
from akv_jax.selection import common
from akv_jax.selection.base import Needs, Observations, Scorer, register


@jax.jit
def tova_scores(q_last: jax.Array, kv: DenseKV) -> jax.Array:
  """TOVA: attention of the last query, averaged over the G heads of each kv head.

  The last query sees every valid key, so no causal mask is applied.

  Args:
    q_last: [B, N, H] query of the most recent token.
    kv: cache with k, v: [B, K, S, H].

  Returns:
    f32[B, K, S], -inf at padded slots.
  """
  if q_last.ndim != 3:
    raise ValueError(f"q_last must be [B, N, H], got shape {q_last.shape}")
  q = common.group_queries(q_last[:, :, None, :], kv, "q_last")
  probs = common.gqa_softmax(q, kv, None)  # [B, K, G, 1, S]
  return common.mask_invalid(jnp.mean(probs[:, :, :, 0, :], axis=2), kv)


@register
@dataclasses.dataclass(frozen=True)
class TOVA(Scorer):
  """Attention of the last prompt query, averaged over the G query heads of each kv head."""

  name = "tova"

  def needs(self, s: int) -> Needs:
    return Needs(queries=1)

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    return tova_scores(obs.queries[:, :, -1], kv)
