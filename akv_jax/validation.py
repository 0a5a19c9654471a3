"""Static (trace-time) validation of shapes and settings. Each raises ValueError naming the offending value.

Value problems (NaN/Inf, lengths out of range, a cache that ran out of room) cannot be seen at trace time; they
are checked by `akv_jax.checks.checked`, an opt-in checkify wrapper.
"""

from __future__ import annotations

import jax

from akv_jax.cache import CompressedKV, DenseKV


def dense(kv: DenseKV, *, per_row_lengths: bool = False) -> tuple[int, int, int, int]:
  """Checks a DenseKV; returns (B, K, S, H)."""
  if not isinstance(kv, DenseKV):
    raise ValueError(f"expected a DenseKV, got {type(kv).__name__}")
  if kv.k.ndim != 4:
    raise ValueError(f"k must be [B, K, S, H], got shape {kv.k.shape}")
  if kv.v.shape != kv.k.shape:
    raise ValueError(f"v shape {kv.v.shape} must equal k shape {kv.k.shape}")
  b, kh, s, _ = kv.k.shape
  lshape = jax.numpy.shape(kv.lengths)
  allowed = [(b,)] if per_row_lengths else [(b,), (b, kh)]
  if lshape not in allowed:
    raise ValueError(f"lengths shape {lshape} must be one of {allowed} for k of shape {kv.k.shape}")
  if kv.positions is not None and kv.positions.shape != (b, kh, s):
    raise ValueError(f"positions shape {kv.positions.shape} must be {(b, kh, s)}")
  return b, kh, s, kv.k.shape[3]


def queries(q: jax.Array, b: int, kh: int, h: int, *, name: str = "queries", ranks=(4,)) -> tuple[int, ...]:
  """Checks query heads against a cache with K kv heads of dim H; returns q.shape."""
  if q.ndim not in ranks:
    want = " or ".join({3: "[B, N, H]", 4: "[B, N, T, H]"}[r] for r in ranks)
    raise ValueError(f"{name} must be {want}, got shape {q.shape}")
  if q.shape[0] != b:
    raise ValueError(f"{name} batch {q.shape[0]} does not match the cache batch {b}")
  if q.shape[1] % kh:
    raise ValueError(f"{name} heads N={q.shape[1]} must be a multiple of the kv heads K={kh}")
  if q.shape[-1] != h:
    raise ValueError(f"{name} head dim {q.shape[-1]} does not match the cache head dim {h}")
  return q.shape


def compressed(ckv: CompressedKV) -> tuple[int, int, int]:
  """Checks a CompressedKV; returns (B, K, H)."""
  if not isinstance(ckv, CompressedKV):
    raise ValueError(f"expected a CompressedKV, got {type(ckv).__name__}")
  return ckv.batch, ckv.num_kv_heads, ckv.head_dim


def token(x: jax.Array, ckv: CompressedKV, name: str) -> None:
  want = (ckv.batch, ckv.num_kv_heads, ckv.head_dim)
  if x.shape != want:
    raise ValueError(f"{name} must be [B, K, H] = {want}, got shape {x.shape}")
