"""Per-layer statistics of a compressed cache against the dense cache it came from, usable under jit.

All figures are computed from the arrays actually held (bytes) or from the kept tokens' dequantized values
(errors, attention mass); nothing is inferred from the policy.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from akv_jax import body as _body
from akv_jax.cache import CompressedKV, DenseKV, QuantizedTensor, dense_bf16_bytes, nbytes
from akv_jax.pipeline import logical_view
from akv_jax.softmax import masked_softmax


def _bits(x) -> int:
  return x.bits if isinstance(x, QuantizedTensor) else 16


def _rel_err(approx: jax.Array, exact: jax.Array, mask: jax.Array) -> jax.Array:
  num = jnp.sum(jnp.where(mask[..., None], (approx - exact) ** 2, 0.0))
  den = jnp.sum(jnp.where(mask[..., None], exact ** 2, 0.0))
  return jnp.sqrt(num / jnp.maximum(den, 1e-30))


def _full_attention(q: jax.Array, kv: DenseKV) -> jax.Array:
  """f32[B, K, T, S] attention (averaged over the G heads of each kv head) of queries q [B, N, T, H]."""
  b, n, t, h = q.shape
  kh = kv.k.shape[1]
  qg = q.astype(jnp.float32).reshape(b, kh, n // kh, t, h) / math.sqrt(h)
  sc = jnp.einsum("BKGTH,BKSH->BKGTS", qg, kv.k.astype(jnp.float32))
  valid = kv.valid()[:, :, None, None, :]
  return jnp.mean(masked_softmax(sc, valid), axis=2)


@jax.jit
def layer_stats(kv: DenseKV, ckv: CompressedKV, queries: jax.Array | None = None) -> dict:
  """Statistics of one layer as a pytree of scalars.

  Args:
    kv: the dense cache ckv was compressed from (positions 0..S-1, lengths i32[B]).
    ckv: the compressed cache.
    queries: optional [B, N, T, H] test queries of tokens after the prompt (each sees every prompt token), for
      attention mass retained.

  Returns:
    dict with bytes, dense_bf16_bytes (int32: exact below 2 GiB per layer), kept_tokens (mean per row and head), key_bits, value_bits,
    key_rel_error / value_rel_error (kept tokens against their originals), and, with queries,
    attention_retained (share of the full cache's attention mass on kept tokens) and guard_mass (share on the
    bf16 sink and recent tokens).
  """
  s = kv.k.shape[2]
  k, v, pos, valid = logical_view(ckv)
  src = jnp.clip(pos, 0, s - 1)
  k_ref = jnp.take_along_axis(kv.k.astype(jnp.float32), src[..., None], axis=2)
  v_ref = jnp.take_along_axis(kv.v.astype(jnp.float32), src[..., None], axis=2)
  stats = {
      "bytes": jnp.asarray(nbytes(ckv), jnp.int32),
      "dense_bf16_bytes": jnp.asarray(dense_bf16_bytes(kv), jnp.int32),
      "kept_tokens": jnp.mean(ckv.kept_tokens().astype(jnp.float32)),
      "key_bits": jnp.asarray(_bits(ckv.body_k), jnp.float32),
      "value_bits": jnp.asarray(_bits(ckv.body_v), jnp.float32),
      "key_rel_error": _rel_err(k, k_ref, valid),
      "value_rel_error": _rel_err(v, v_ref, valid),
  }
  if queries is not None:
    p = _full_attention(queries, kv)                                      # [B, K, T, S]
    bidx = jnp.arange(kv.k.shape[0])[:, None, None]
    hidx = jnp.arange(kv.k.shape[1])[None, :, None]
    sinks = jnp.broadcast_to(jnp.arange(s)[None, None, :] < ckv.sink_fill[:, None, None], kv.k.shape[:3])
    kept = sinks.at[bidx, hidx, jnp.where(valid, src, s)].set(True, mode="drop")
    guard = sinks.at[bidx, hidx, jnp.where(ckv.recent_pos >= 0, ckv.recent_pos, s)].set(True, mode="drop")
    total = jnp.sum(p)
    stats["attention_retained"] = jnp.sum(jnp.where(kept[:, :, None], p, 0.0)) / total
    stats["guard_mass"] = jnp.sum(jnp.where(guard[:, :, None], p, 0.0)) / total
  return stats


def head_budgets(ckv: CompressedKV) -> jax.Array:
  """i32[B, K] body slots each head owns (differs per head only for AdaKV)."""
  return _body.head_capacity(ckv)
