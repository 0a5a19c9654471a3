"""The one masked softmax behind every plain-jnp attention and scoring path (the reference attention, dense
attention, extend, the layer statistics and the scorers); the fused and chunked paths keep their own online
softmax and are tested against these references.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def masked_softmax(logits: jax.Array, mask: jax.Array) -> jax.Array:
  """Softmax over the last axis of f32 logits [..., S] restricted to mask bool[..., S] (broadcastable).

  Exactly 0 where the mask is False, and a row with no True entry is all zeros (no NaN, no uniform weights over
  nothing). Masked logits are replaced with `where`, not offset, so NaN or inf there cannot leak into the max or
  the sum.
  """
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)
