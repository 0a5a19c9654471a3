"""Rotated storage: a randomized Hadamard transform per layer and kv head applied to keys and values before they are
stored, so that quantization sees rotated vectors whose outlier channels are spread over all channels (QuaRot's
and SpinQuant's idea, here on the KV cache).

Axis legend: B batch, K kv heads, G query heads per kv head, S tokens, H head dim (a power of 2).

R_k = Hd diag(s_k) with Hd the orthonormal Sylvester-Hadamard matrix of size H and s_k random signs, one set for
keys and one for values per (layer, kv head), drawn from the policy's seed and the layer index. It is orthogonal,
so attention needs no change inside: q . k = (R q) . (R k), and sum_t p_t v_t = R^T sum_t p_t (R v_t). Every part
of the cache (sinks, body, recent window) is stored rotated (keys after RoPE), the query is rotated once per step
and the output rotated back once, around whichever attention path runs (reference, chunked XLA or the fused
kernel); appended tokens are rotated on their way in, and `decompress` rotates back. Rotation alone (bf16
storage) changes attention only by rounding (tests/library/test_rotation.py).

Where it helps: per-token groups (values, or keys quantized per token), whose range an outlier channel would set
for every other channel. KIVI's per-channel key groups already give each channel its own range; on synthetic keys
with three 12x outlier channels (tests/library/test_rotation.py's input) rotation cut the attention-output error
of per-token 2-bit keys and values from 1.06 to 0.54 of the output's norm but raised that of per-channel 2-bit
keys from 0.50 to 0.86 (CPU, this repository's test shapes). What it does on a real model is measured there.

The signs are held in the cache (`CompressedKV.rotation`, int8[B, K, 2, H]: keys then values), a few hundred bytes
a layer, counted in its bytes like everything else.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.lru_cache(maxsize=8)
def _hadamard(h: int) -> np.ndarray:
  """The orthonormal Sylvester-Hadamard matrix f32[H, H] (symmetric)."""
  if h < 1 or h & (h - 1):
    raise ValueError(f"rotation needs a power-of-2 head dim, got H={h}")
  m = np.ones((1, 1), np.float32)
  while m.shape[0] < h:
    m = np.block([[m, m], [m, -m]])
  return m / np.sqrt(h, dtype=np.float32)


def signs(seed: int, layer: int, kv_heads: int, head_dim: int) -> np.ndarray:
  """The random signs int8[K, 2, H] (keys, values) of one layer, fixed by the seed and the layer index."""
  _hadamard(head_dim)
  rng = np.random.default_rng([int(seed), int(layer)])
  return rng.choice(np.array([-1, 1], np.int8), size=(kv_heads, 2, head_dim))


def rotate(x: jax.Array, s: jax.Array) -> jax.Array:
  """R x for x [B, K, ..., H] with signs s int8[B, K, H] (one set per row and kv head): f32, (x * s) Hd."""
  hd = jnp.asarray(_hadamard(x.shape[-1]))
  sf = s.astype(jnp.float32).reshape(s.shape[:2] + (1,) * (x.ndim - 3) + s.shape[2:])
  return jnp.einsum("...H,HJ->...J", x.astype(jnp.float32) * sf, hd, precision=jax.lax.Precision.HIGHEST)


def unrotate(y: jax.Array, s: jax.Array) -> jax.Array:
  """R^T y for y [B, K, ..., H]: f32, (y Hd) * s."""
  hd = jnp.asarray(_hadamard(y.shape[-1]))
  sf = s.astype(jnp.float32).reshape(s.shape[:2] + (1,) * (y.ndim - 3) + s.shape[2:])
  return jnp.einsum("...H,HJ->...J", y.astype(jnp.float32), hd, precision=jax.lax.Precision.HIGHEST) * sf


def _by_kv_head(q: jax.Array, kh: int) -> jax.Array:
  """q [B, N, H] or [B, N, T, H] -> [B, K, G, H] or [B, K, G, T, H]."""
  b, n = q.shape[:2]
  return q.reshape(b, kh, n // kh, *q.shape[2:])


def rotate_queries(q: jax.Array, s: jax.Array) -> jax.Array:
  """Queries [B, N, H] or [B, N, T, H] into the keys' basis (signs s int8[B, K, H]), f32, same shape."""
  return rotate(_by_kv_head(q, s.shape[1]), s).reshape(q.shape)


def unrotate_output(o: jax.Array, s: jax.Array) -> jax.Array:
  """Attention outputs [B, N, H] or [B, N, T, H] from the values' basis back (signs s int8[B, K, H]), f32."""
  return unrotate(_by_kv_head(o, s.shape[1]), s).reshape(o.shape)
