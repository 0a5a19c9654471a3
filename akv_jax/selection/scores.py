"""Token-importance scores for KV-cache selection: one score per (row, kv head, slot), higher = keep.

Axis legend: B batch, T query length, S key length, N query heads, K kv heads, G = N / K query heads per kv
head, H head dim, W observation window.

Every function returns f32[B, K, S] and is pure and jitted, with its knobs static keyword arguments, so an
eager call compiles once per shape and configuration instead of once per primitive, and static problems
raise ValueError at trace time. Conventions shared by all of them:

* GQA: query head n belongs to kv head n // G, and the G query heads of a kv head are combined by averaging
  their attention, so a score never exists per query head (storing per query head would inflate the cache G
  times, see algorithms.md).
* Padding: a slot at or beyond its head's length (`kv.valid()` False) scores -inf and never enters a softmax
  denominator, a pooling window or a norm, so garbage (even NaN) in padded K/V cannot move a valid score.
* Attention is softmax(q . k / sqrt(H)) in float32 over valid keys, causal by original position: a query at
  position p sees the keys whose `kv.token_positions()` are <= p. A query that sees no key contributes zero.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from akv_jax.cache import DenseKV

Pooling = Literal["max", "avg"]
Reduce = Literal["sum", "mean"]

# Sinks must outrank any position-based score, yet stay finite so that callers may still add or compare
# scores without producing inf - inf.
SINK_SCORE = 1e30


def _check_kv(kv: DenseKV) -> tuple[int, int, int, int]:
  if kv.k.ndim != 4:
    raise ValueError(f"kv.k must be [B, K, S, H], got shape {kv.k.shape}")
  if kv.v.shape != kv.k.shape:
    raise ValueError(f"kv.v shape {kv.v.shape} differs from kv.k shape {kv.k.shape}")
  return kv.shape


def _group_queries(q: jax.Array, kv: DenseKV, name: str) -> jax.Array:
  """Validates q: [B, N, T, H] against kv and returns f32[B, K, G, T, H] (query head n -> kv head n // G)."""
  b, kh, _, h = _check_kv(kv)
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


def _last_positions(kv: DenseKV, t: int) -> jax.Array:
  """i32[B, K, T]: original positions of the last T valid slots of each head, -1 where the slot is before 0.

  Read from `token_positions()` rather than computed as lengths - T + t so that a cache whose positions were
  recorded (already compressed once) still gets the causal mask right; both agree when positions is None.
  """
  _, _, s, _ = kv.shape
  slots = kv.head_lengths()[:, :, None] - t + jnp.arange(t, dtype=jnp.int32)
  pos = jnp.take_along_axis(kv.token_positions(), jnp.clip(slots, 0, s - 1), axis=2)
  return jnp.where(slots >= 0, pos, -1).astype(jnp.int32)


def _attention(q: jax.Array, kv: DenseKV, q_pos: jax.Array | None) -> jax.Array:
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
  # `where` (not adding -inf) so NaN/inf in padded keys cannot leak through the max or the sum.
  logits = jnp.where(mask, logits, -jnp.inf)
  m = jnp.max(logits, axis=-1, keepdims=True)
  m = jnp.where(jnp.isfinite(m), m, 0.0)
  e = jnp.where(mask, jnp.exp(logits - m), 0.0)
  den = jnp.sum(e, axis=-1, keepdims=True)
  return e / jnp.where(den > 0, den, 1.0)


def _mask_invalid(scores: jax.Array, kv: DenseKV) -> jax.Array:
  return jnp.where(kv.valid(), scores, -jnp.inf).astype(jnp.float32)


def _pool(scores: jax.Array, valid: jax.Array, kernel_size: int, pooling: str) -> jax.Array:
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


@functools.partial(jax.jit, static_argnames=("n_sink",))
def streaming_scores(kv: DenseKV, *, n_sink: int = 4) -> jax.Array:
  """StreamingLLM: attention sinks first, then the most recent tokens.

  Scores are by original position (`kv.token_positions()`), so a cache that was compressed before still keeps
  its true first tokens as sinks. Positions are kept as stored: nothing is re-rotated here.

  Args:
    kv: cache with k, v: [B, K, S, H].
    n_sink: tokens with position < n_sink are sinks (static, >= 0).

  Returns:
    f32[B, K, S]: SINK_SCORE (1e30) for sinks, the position for other valid slots, -inf for padding.
  """
  _check_kv(kv)
  if n_sink < 0:
    raise ValueError(f"n_sink must be >= 0, got {n_sink}")
  pos = kv.token_positions()
  scores = jnp.where(pos < n_sink, SINK_SCORE, pos.astype(jnp.float32))
  return _mask_invalid(scores, kv)


def _check_snapkv(window: int, s: int, kernel_size: int, pooling: str, reduce: str) -> None:
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  if window > s:
    raise ValueError(f"window={window} exceeds the cache length S={s}")
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
  if pooling not in ("max", "avg"):
    raise ValueError(f"unknown pooling {pooling!r}, expected 'max' or 'avg'")
  if reduce not in ("sum", "mean"):
    raise ValueError(f"unknown reduce {reduce!r}, expected 'sum' or 'mean'")


def _check_votes(votes: jax.Array, kv: DenseKV) -> None:
  b, kh, s, _ = _check_kv(kv)
  if votes.shape != (b, kh, s):
    raise ValueError(f"votes must be [B, K, S] = {(b, kh, s)} to match the cache, got shape {votes.shape}")


def _snapkv_pool(votes: jax.Array, kv: DenseKV, window: int, kernel_size: int, pooling: str,
                 reduce: str) -> jax.Array:
  """The SnapKV steps after voting: mean over the window (if asked), pool along S, -inf at padding."""
  scores = votes.astype(jnp.float32)
  if reduce == "mean":
    scores = scores / window
  valid = kv.valid()
  if kernel_size > 1:
    scores = _pool(scores, valid, kernel_size, pooling)
  return _mask_invalid(scores, kv)


@functools.partial(jax.jit, static_argnames=("window", "kernel_size", "pooling", "reduce"))
def snapkv_scores(q_obs: jax.Array, kv: DenseKV, *, window: int = 32, kernel_size: int = 7,
                  pooling: Pooling = "max", reduce: Reduce = "mean") -> jax.Array:
  """SnapKV: attention from the observation window, combined over the group, then pooled along S.

  Row b's window query w is the token in slot `head_lengths[b, k] - W + w` (the last W valid tokens; with a
  per-row lengths i32[B] every head agrees). A row shorter than W has leading window queries in negative
  slots; they contribute nothing, and "mean" still divides by W so that sum and mean differ by exactly W.

  Order of operations: sum over the W queries, mean over the G query heads (the "votes", which
  `snapkv_scores_from_votes` accepts from a kernel that computed them), then reduce and pool. Pooling after
  the group mean (kvpress pools each query head first) keeps one pooled score per kv head; for max pooling the
  two orders differ.

  Args:
    q_obs: [B, N, W, H] queries of the last W tokens of each row.
    kv: cache with k, v: [B, K, S, H]; lengths i32[B] or i32[B, K].
    window: W, must equal q_obs.shape[2] and be at most S (static).
    kernel_size: odd pooling width (static); 1 disables pooling.
    pooling: "max" (LongBench configs) or "avg" (divides by the number of valid neighbours).
    reduce: "sum" over the window queries (paper) or "mean" (kvpress).

  Returns:
    f32[B, K, S], -inf at padded slots. Window tokens are scored like any other token.
  """
  _, _, s, _ = _check_kv(kv)
  q = _group_queries(q_obs, kv, "q_obs")
  w = q.shape[3]
  if window >= 1 and w != window:
    raise ValueError(f"window={window} differs from q_obs window length {w} (q_obs shape {q_obs.shape})")
  _check_snapkv(window, s, kernel_size, pooling, reduce)
  probs = _attention(q, kv, _last_positions(kv, w))  # [B, K, G, W, S]
  votes = jnp.mean(jnp.sum(probs, axis=3), axis=2)
  return _snapkv_pool(votes, kv, window, kernel_size, pooling, reduce)


@functools.partial(jax.jit, static_argnames=("window", "kernel_size", "pooling", "reduce"))
def snapkv_scores_from_votes(votes: jax.Array, kv: DenseKV, *, window: int = 32, kernel_size: int = 7,
                             pooling: Pooling = "max", reduce: Reduce = "mean") -> jax.Array:
  """SnapKV scores from window votes computed elsewhere, e.g. by the prefill kernel in the same pass as attention.

  Equal to `snapkv_scores(q_obs, kv, ...)` when votes[b, k, s] is the attention probability of slot s summed
  over the last `window` valid queries and averaged over the G query heads of kv head k (the window_scores
  of pallas_kernels.prefill_scores.prefill_attention).

  Args:
    votes: f32[B, K, S] summed window attention; padded slots may hold anything.
    kv: the cache the votes score; only its shape, lengths and positions are read.
    window, kernel_size, pooling, reduce: as in `snapkv_scores` (static).

  Returns:
    f32[B, K, S], -inf at padded slots.
  """
  _, _, s, _ = _check_kv(kv)
  _check_votes(votes, kv)
  _check_snapkv(window, s, kernel_size, pooling, reduce)
  return _snapkv_pool(votes, kv, window, kernel_size, pooling, reduce)


@functools.partial(jax.jit, static_argnames=("chunk",))
def h2o_scores(queries: jax.Array, kv: DenseKV, *, query_positions: jax.Array | None = None,
               chunk: int = 256) -> jax.Array:
  """H2O heavy hitters: attention accumulated over many queries, averaged over the G heads of a kv head.

  Queries are processed `chunk` at a time under `lax.scan`, so peak memory is O(B * N * chunk * S) rather than
  the full [T, S] attention matrix (the prefill memory trap of algorithms.md).

  Args:
    queries: [B, N, T, H].
    kv: cache with k, v: [B, K, S, H].
    query_positions: i32[B, T] original position of each query; negative marks a padding query, which
      contributes nothing. Default: the positions of the last T valid slots of each head (lengths[b] - T + t
      when the cache recorded no positions). A right-padded prompt must pass -1 for its padding queries.
    chunk: queries per scan step (static, >= 1).

  Returns:
    f32[B, K, S]: sum over queries of the group-mean attention probability; -inf at padded slots.
  """
  b, kh, s, _ = _check_kv(kv)
  q = _group_queries(queries, kv, "queries")
  g, t = q.shape[2], q.shape[3]
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  if query_positions is None:
    q_pos = _last_positions(kv, t)
  else:
    if query_positions.shape != (b, t):
      raise ValueError(f"query_positions must be [B, T] = {(b, t)}, got shape {query_positions.shape}")
    q_pos = jnp.broadcast_to(query_positions.astype(jnp.int32)[:, None, :], (b, kh, t))

  c = min(chunk, t)
  n_chunks = -(-t // c)
  pad = n_chunks * c - t
  # Padding queries get position -1, which the attention mask turns into all-zero rows.
  q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
  q_pos = jnp.pad(q_pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
  q = jnp.moveaxis(q.reshape(b, kh, g, n_chunks, c, -1), 3, 0)  # [n_chunks, B, K, G, c, H]
  q_pos = jnp.moveaxis(q_pos.reshape(b, kh, n_chunks, c), 2, 0)  # [n_chunks, B, K, c]

  def step(acc, xs):
    q_c, pos_c = xs
    return acc + jnp.sum(_attention(q_c, kv, pos_c), axis=(2, 3)), None

  acc, _ = lax.scan(step, jnp.zeros((b, kh, s), jnp.float32), (q, q_pos))
  return _mask_invalid(acc / g, kv)


@jax.jit
def h2o_scores_from_votes(votes: jax.Array, kv: DenseKV) -> jax.Array:
  """H2O scores from accumulated attention computed elsewhere (the prefill kernel's h2o_scores).

  Args:
    votes: f32[B, K, S] attention probability of each slot summed over all prefill queries and averaged over
      the G query heads of its kv head; padded slots may hold anything.
    kv: the cache the votes score; only its shape and lengths are read.

  Returns:
    f32[B, K, S] as `h2o_scores` over all prompt queries: the votes, -inf at padded slots.
  """
  _check_votes(votes, kv)
  return _mask_invalid(votes, kv)


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
  q = _group_queries(q_last[:, :, None, :], kv, "q_last")
  probs = _attention(q, kv, None)  # [B, K, G, 1, S]
  return _mask_invalid(jnp.mean(probs[:, :, :, 0, :], axis=2), kv)


@jax.jit
def knorm_scores(kv: DenseKV) -> jax.Array:
  """KNorm: minus the L2 norm of each key (low-norm keys draw the most attention), computed in f32.

  Args:
    kv: cache with k, v: [B, K, S, H].

  Returns:
    f32[B, K, S], -inf at padded slots.
  """
  _check_kv(kv)
  norm = jnp.linalg.norm(kv.k.astype(jnp.float32), axis=-1)
  return _mask_invalid(-norm, kv)
