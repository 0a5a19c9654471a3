"""KNorm (Devoto et al., 2024): low-norm keys draw the most attention, so keep them; no queries needed."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from akv_jax.cache import DenseKV
from akv_jax.selection import common
from akv_jax.selection.base import Observations, Scorer, register


@jax.jit
def knorm_scores(kv: DenseKV) -> jax.Array:
  """KNorm: minus the L2 norm of each key (low-norm keys draw the most attention), computed in f32.

  Args:
    kv: cache with k, v: [B, K, S, H].

  Returns:
    f32[B, K, S], -inf at padded slots.
  """
  common.check_kv(kv)
  norm = jnp.linalg.norm(kv.k.astype(jnp.float32), axis=-1)
  return common.mask_invalid(-norm, kv)


@register
@dataclasses.dataclass(frozen=True)
class KNorm(Scorer):
  """Minus the L2 norm of each key."""

  name = "knorm"

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    del obs
    return knorm_scores(kv)
