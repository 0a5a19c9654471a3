"""StreamingLLM (Xiao et al., 2024): attention sinks plus a sliding window of the most recent tokens."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from akv_jax.cache import DenseKV
from akv_jax.selection import common
from akv_jax.selection.base import Observations, Scorer, register


@functools.partial(jax.jit, static_argnames=("n_sink",))
def streaming_scores(kv: DenseKV, *, n_sink: int = 4) -> jax.Array:
  """StreamingLLM: attention sinks first, then the most recent tokens.

  Scores are by original position (`kv.token_positions()`), so a cache that was compressed before still keeps
  its true first tokens as sinks. Positions are kept as stored: nothing is re-rotated here.

  Args:
    kv: cache with k, v: [B, K, S, H].
    n_sink: tokens with position < n_sink are sinks (static, >= 0).

  Returns:
    f32[B, K, S]: common.SINK_SCORE (1e30) for sinks, the position for other valid slots, -inf for padding.
  """
  common.check_kv(kv)
  if n_sink < 0:
    raise ValueError(f"n_sink must be >= 0, got {n_sink}")
  pos = kv.token_positions()
  scores = jnp.where(pos < n_sink, common.SINK_SCORE, pos.astype(jnp.float32))
  return common.mask_invalid(scores, kv)


@register
@dataclasses.dataclass(frozen=True)
class Streaming(Scorer):
  """StreamingLLM: no scoring; the policy's whole budget is its sinks and recent window, which slides while
  decoding (pair it with the `SlidingWindow` decode rule)."""

  name = "streaming"
  decode_rule = "sliding_window"
  recency_only = True

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    del obs
    return streaming_scores(kv)
