"""What the token scorers share: GQA query grouping, the masked softmax, padding masks and pooling.

Axis legend: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query heads per kv
head, H head dim.

Conventions every scorer follows:

* GQA: query head n belongs to kv head n // G, and the G query heads of a kv head are combined by averaging
  their attention, so a score never exists per query head (storing per query head would inflate the cache G
  times, see algorithms.md).
* Padding: a slot at or beyond its head's length (`kv.valid()` False) scores -inf and never enters a softmax
  denominator, a pooling window or a norm, so garbage (even NaN) in padded K/V cannot move a valid score.
* Attention is softmax(q . k / sqrt(H)) in float32 over valid keys, causal by original position: a query at
  position p sees the keys whose `kv.token_positions()` are <= p. A query that sees no key contributes zero.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax

from akv_jax.cache import DenseKV
from akv_jax.softmax import masked_softmax

# Sinks must outrank any position-based score, yet stay finite so that callers may still add or compare
# scores without producing inf - inf.
SINK_SCORE = 1e30


def check_kv(kv: DenseKV) -> tuple[int, int, int, int]:
  if kv.k.ndim != 4:
    raise ValueError(f"kv.k must be [B, K, S, H], got shape {kv.k.shape}")
  if kv.v.shape != kv.k.shape:
    raise ValueError(f"kv.v shape {kv.v.shape} differs from kv.k shape {kv.k.shape}")
  return kv.shape


def group_queries(q: jax.Array, kv: DenseKV, name: str) -> jax.Array:
  """Validates q: [B, N, T, H] against kv and returns f32[B, K, G, T, H] (query head n -> kv head n // G)."""
  b, kh, _, h = check_kv(kv)
  if q.ndim != 4:
    raise ValueError(f"{name} must be [B, N, T, H], got shape {q.shape}")
  qb, n, t, qh = q.shape
  if qb != b:
    raise ValueError(f"{name} batch {qb} differs from the cache batch {b}")
  if qh != h:
    raise ValueError(f"{name} head dim {qh} differs from the cache head dim {h}")
  if n % kh:
    raise ValueError(f"{name} has N={n} query heads, not a multiple of K={kh} kv heads")
  # Contiguous groups: heads n = k * G + g, the layout every GQA checkpoint we know of uses.
  return q.astype(jnp.float32).reshape(b, kh, n // kh, t, h)


def last_positions(kv: DenseKV, t: int) -> jax.Array:
  """i32[B, K, T]: original positions of the last T valid slots of each head, -1 where the slot is before 0.

  Read from `token_positions()` rather than computed as lengths - T + t so that a cache whose positions were
  recorded (already compressed once) still gets the causal mask right; both agree when positions is None.
  """
  _, _, s, _ = kv.shape
  slots = kv.head_lengths()[:, :, None] - t + jnp.arange(t, dtype=jnp.int32)
  pos = jnp.take_along_axis(kv.token_positions(), jnp.clip(slots, 0, s - 1), axis=2)
  return jnp.where(slots >= 0, pos, -1).astype(jnp.int32)


def gqa_softmax(q: jax.Array, kv: DenseKV, q_pos: jax.Array | None) -> jax.Array:
  """Masked softmax attention probabilities.

  Args:
    q: f32[B, K, G, T, H] grouped queries.
    kv: the cache; only its keys, lengths and positions are read.
    q_pos: i32[B, K, T] query positions for the causal mask (negative = padding query that attends to
      nothing), or None for queries that see every valid key.

  Returns:
    f32[B, K, G, T, S], exactly 0 at masked keys; a row that sees no key is all zeros instead of NaN.
  """
  h = q.shape[-1]
  k = kv.k.astype(jnp.float32)
  # HIGHEST keeps the dot in true f32 on accelerators whose default matmul rounds inputs to bf16: scores decide
  # which tokens survive, and near-ties flipping between backends would make selection irreproducible.
  logits = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, precision=lax.Precision.HIGHEST) / math.sqrt(h)
  mask = kv.valid()[:, :, None, None, :]
  if q_pos is not None:
    k_pos = kv.token_positions()[:, :, None, None, :]
    qp = q_pos[:, :, None, :, None]
    mask = mask & (k_pos <= qp) & (qp >= 0)
  return masked_softmax(logits, mask)


def mask_invalid(scores: jax.Array, kv: DenseKV) -> jax.Array:
  return jnp.where(kv.valid(), scores, -jnp.inf).astype(jnp.float32)


def pool(scores: jax.Array, valid: jax.Array, kernel_size: int, pooling: str) -> jax.Array:
  """'same'-size stride-1 pooling along S of f32[B, K, S] that only ever looks at valid slots."""
  pad = kernel_size // 2
  window = (1, 1, kernel_size)
  padding = ((0, 0), (0, 0), (pad, pad))
  if pooling == "max":
    x = jnp.where(valid, scores, -jnp.inf)
    return lax.reduce_window(x, -jnp.inf, lax.max, window, (1, 1, 1), padding)
  total = lax.reduce_window(jnp.where(valid, scores, 0.0), 0.0, lax.add, window, (1, 1, 1), padding)
  count = lax.reduce_window(valid.astype(jnp.float32), 0.0, lax.add, window, (1, 1, 1), padding)
  # A valid slot always counts itself, so count >= 1 wherever the result is kept.
  return total / jnp.maximum(count, 1.0)


def check_votes(votes: jax.Array, kv: DenseKV) -> None:
  b, kh, s, _ = check_kv(kv)
  if votes.shape != (b, kh, s):
    raise ValueError(f"votes must be [B, K, S] = {(b, kh, s)} to match the cache, got shape {votes.shape}")
