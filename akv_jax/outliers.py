"""Outlier key channels: a few channels of each (row, kv head) held at 16 bits beside the low-bit codes.

Axis legend: B batch, K kv heads, G query heads per kv head, N = K * G query heads, T observation queries,
S tokens, H head dim, O outlier channels.

KVQuant's dense-and-sparse idea, per channel so that a kernel can read it: the O key channels whose quantization
would cost the attention scores most are cut out before quantizing (set to 0, so with KIVI's per-channel groups
their codes form constant groups and decode to exactly 0) and kept as a [.., S, O] array in the cache's 16-bit
dtype. A reader then needs one extra term, q[channels] . outliers, beside q . dequantize(codes).

Which channels: a key channel's score error under per-channel min/max quantization is about |q_c| times its
step, and its step is the channel's range over the `group` tokens that share a scale. So channel c of kv head k
is ranked by
  mean over token groups of (max - min of k[., c] in the group) * rms(q[., c])
over the prompt's valid tokens and, when observation queries are given, the G query heads of that kv head and the
T observation queries (their RMS, 1 without queries). A channel that is large but steady within a group (a slow
drift, a constant offset) costs little and is not chosen; one that swings within a group (after RoPE, the fast
rotary pairs of a large channel) is. The channels are chosen once per row in prefill (they are statistics of this
request) and kept for the whole generation; tokens appended later are split the same way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Observation queries a policy without a scorer of its own asks the model for, to rank the channels.
QUERIES = 32


def check_count(outliers: int, head_dim: int) -> None:
  """ValueError unless 0 <= outliers < H (at least one channel must stay quantized)."""
  if not 0 <= outliers < head_dim:
    raise ValueError(f"outliers={outliers} outlier channels must be >= 0 and below the head dim H={head_dim}")


def choose(k: jax.Array, valid: jax.Array, count: int, queries: jax.Array | None = None, *,
           group: int = 32) -> jax.Array:
  """The `count` channels of each (row, kv head) ranked highest by mean group range(k) * rms(q): i32[B, K, O],
  ascending.

  k [B, K, S, H] (in the basis it is stored in); valid bool[B, K, S]; queries [B, N, T, H] in the same basis
  (N a multiple of K), or None; group: tokens per scale (the keys' QuantSpec.group).
  """
  b, kh, s, h = k.shape
  check_count(count, h)
  pad = -s % group
  kf = jnp.pad(k.astype(jnp.float32), ((0, 0), (0, 0), (0, pad), (0, 0))).reshape(b, kh, -1, group, h)
  ok = jnp.pad(valid, ((0, 0), (0, 0), (0, pad))).reshape(b, kh, -1, group)[..., None]
  hi = jnp.max(jnp.where(ok, kf, -jnp.inf), axis=3)
  lo = jnp.min(jnp.where(ok, kf, jnp.inf), axis=3)
  filled = jnp.any(ok, axis=3)                                                # [B, K, S/g, 1]
  spread = jnp.where(filled, hi - lo, 0.0)
  score = jnp.sum(spread, axis=2) / jnp.maximum(jnp.sum(filled, axis=2), 1)   # [B, K, H]
  if queries is not None:
    qf = queries.astype(jnp.float32).reshape(b, kh, -1, h)                   # [B, K, G * T, H]
    score = score * jnp.sqrt(jnp.mean(jnp.square(qf), axis=2))
  top = jax.lax.top_k(score, count)[1] if count else jnp.zeros((b, kh, 0), jnp.int32)
  return jnp.sort(top, axis=-1).astype(jnp.int32)


def _mask(channels: jax.Array, h: int) -> jax.Array:
  """bool[B, K, H]: True at the outlier channels."""
  return jnp.any(channels[..., None] == jnp.arange(h), axis=-2)


def split(x: jax.Array, channels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """x [B, K, S, H] -> (x with the channels set to 0, x[..., channels] [B, K, S, O] in x's dtype)."""
  h = x.shape[-1]
  out = jnp.take_along_axis(x, jnp.broadcast_to(channels[:, :, None, :], x.shape[:3] + channels.shape[-1:]),
                            axis=-1)
  return jnp.where(_mask(channels, h)[:, :, None, :], jnp.zeros((), x.dtype), x), out


def merge(x: jax.Array, outliers: jax.Array, channels: jax.Array) -> jax.Array:
  """The inverse of `split`: x [B, K, S, H] with x[..., channels] = outliers [B, K, S, O]."""
  h = x.shape[-1]
  onehot = (channels[..., None] == jnp.arange(h)).astype(x.dtype)            # [B, K, O, H]
  placed = jnp.einsum("BKSO,BKOH->BKSH", outliers.astype(x.dtype), onehot, precision=jax.lax.Precision.HIGHEST)
  return jnp.where(_mask(channels, h)[:, :, None, :], placed, x)


def queries_at(qg: jax.Array, channels: jax.Array) -> jax.Array:
  """Grouped queries qg [B, K, G, H] at each kv head's outlier channels -> [B, K, G, O]."""
  idx = jnp.broadcast_to(channels[:, :, None, :], qg.shape[:3] + channels.shape[-1:])
  return jnp.take_along_axis(qg, idx, axis=-1)
