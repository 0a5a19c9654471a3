"""Attention of a few query tokens over a compressed cache (plain-jnp reference, the XLA path).

Keys and values of a kept token may sit in different places (KIVI's residual rule quantizes a value before its
key), so scores are computed over [sinks | body keys | recent keys] and each recent slot is paired with its value,
which is either in the recent buffer or, for the first value_fill - key_fill recent slots, already in the body.
Softmax is order-invariant, so only this pairing matters, not where a token is stored.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from akv_jax import body as _body
from akv_jax import chunked as _chunked
from akv_jax import dispatch
from akv_jax import fused as _fused
from akv_jax import rotation as _rotation
from akv_jax import validation
from akv_jax.cache import CompressedKV
from akv_jax.softmax import masked_softmax


def _scores(qg: jax.Array, keys: jax.Array) -> jax.Array:
  """qg [B, K, G, T, H] x keys [B, K, S, H] -> f32[B, K, G, T, S]."""
  return jnp.einsum("BKGTH,BKSH->BKGTS", qg, keys.astype(jnp.float32))


def cache_slots(ckv: CompressedKV):
  """Every slot of a cache as one key/value sequence: [sinks | body | recent], dequantized.

  Returns (keys f32[B, K, C, H], values f32[B, K, C, H], positions i32[B, K, C], valid bool[B, K, C]) with
  C = Z + M + R. Recent slot j is paired with its value, which for the first value_fill - key_fill recent slots
  already sits in the body at slot key_fill + j.
  """
  b, kh, _ = validation.compressed(ckv)
  z = ckv.sink_k.shape[2]
  spos = jnp.broadcast_to(jnp.arange(z, dtype=jnp.int32), (b, kh, z))
  svalid = spos < ckv.sink_fill[:, None, None]
  bk = _body.dequantize_heads(ckv, ckv.body_k)
  bv = _body.dequantize_heads(ckv, ckv.body_v)
  bpos = _body.head_positions(ckv)
  m = bk.shape[2]
  kb, vb = ckv.key_fill, ckv.value_fill
  bvalid = jnp.arange(m)[None, None, :] < kb[..., None]
  rslot = jnp.arange(ckv.recent_capacity)[None, None, :]
  rvalid = rslot < ckv.recent_fill[..., None]
  in_body = rslot < (vb - kb)[..., None]
  from_body = jnp.take_along_axis(bv, jnp.clip(kb[..., None] + rslot, 0, max(m - 1, 0))[..., None], axis=2) \
      if m else jnp.zeros_like(ckv.recent_v, jnp.float32)
  rv = jnp.where(in_body[..., None], from_body, ckv.recent_v.astype(jnp.float32))
  keys = jnp.concatenate([ckv.sink_k.astype(jnp.float32), bk, ckv.recent_k.astype(jnp.float32)], axis=2)
  values = jnp.concatenate([ckv.sink_v.astype(jnp.float32), bv, rv], axis=2)
  kpos = jnp.concatenate([spos, bpos, ckv.recent_pos], axis=2)
  valid = jnp.concatenate([svalid, bvalid, rvalid], axis=2)
  return keys, values, kpos, valid


def _attend(q: jax.Array, ckv: CompressedKV, scale: float | None, return_probs: bool):
  b, kh, h = validation.compressed(ckv)
  validation.queries(q, b, kh, h, name="q", ranks=(3, 4))
  single = q.ndim == 3
  q4 = q[:, :, None] if single else q                                   # [B, N, T, H]
  n, t = q4.shape[1], q4.shape[2]
  g = n // kh
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  qg = (q4.astype(jnp.float32) * scale).reshape(b, kh, g, t, h)
  # Query t is the (T - t)-th most recent token: it sees positions up to next_pos - T + t.
  qpos = (ckv.next_pos[:, None] - t + jnp.arange(t))[:, None, None, :, None]   # [B, 1, 1, T, 1]

  keys, values, kpos, valid = cache_slots(ckv)
  s = _scores(qg, keys)
  visible = valid[:, :, None, None, :] & (kpos[:, :, None, None, :] <= qpos)
  p = masked_softmax(s, visible)
  out = jnp.einsum("BKGTS,BKSH->BKGTH", p, values).reshape(b, n, t, h).astype(q.dtype)
  if single:
    out = out[:, :, 0]
  if not return_probs:
    return out
  # Per-slot attention of body then recent slots, averaged over the G query heads and summed over T (H2O).
  probs = jnp.sum(jnp.mean(p, axis=2), axis=2)[..., ckv.sink_k.shape[2]:]
  return out, probs


@functools.partial(jax.jit, static_argnames=("scale", "return_probs", "implementation", "interpret"))
def attend(q: jax.Array, ckv: CompressedKV, *, scale: float | None = None, return_probs: bool = False,
           implementation: str | None = None, interpret: bool = False):
  """Attention of q over a compressed cache.

  Args:
    q: [B, N, H] one query token per row, or [B, N, T, H] the last T tokens (already appended; query t sees
      positions up to next_pos - T + t). N must be a multiple of the cache's K.
    ckv: CompressedKV.
    scale: softmax scale, default 1/sqrt(H).
    return_probs: also return f32[B, K, M + R], each body and recent slot's attention averaged over the G query
      heads (feed it to `observe` for H2O).
    implementation: "reference" (the plain-jnp definition: dequantize everything, two einsums), "xla"
      (akv_jax.chunked: the body a chunk at a time with an online softmax, codes unpacked per sub-block; one
      query token, no probabilities), "pallas" (the fused kernel of pallas_kernels.decode_attention: one query
      token, no probabilities, keys quantized per channel and values per token or bf16), or None: Pallas on a
      GPU when the call is one it handles, else "xla" when it handles it, else the reference
      (akv_jax.dispatch). An explicit value that cannot run this call raises; nothing falls back silently.
    interpret: run the Pallas kernel in interpret mode (how it is tested on CPU).

  Returns:
    [B, N, H] (or [B, N, T, H]) in q's dtype, and the probabilities when asked.
  """
  dispatch.check(implementation, interpret)
  b, kh, h = validation.compressed(ckv)
  validation.queries(q, b, kh, h, name="q", ranks=(3, 4))
  if ckv.rotation is not None:
    # Rotated storage (akv_jax.rotation): the query goes into the keys' basis once, the output comes back from
    # the values' basis once, and whichever path runs in between sees an ordinary cache.
    out = attend(_rotation.rotate_queries(q, ckv.rotation[:, :, 0]),
                 dataclasses.replace(ckv, rotation=None), scale=scale, return_probs=return_probs,
                 implementation=implementation, interpret=interpret)
    o, probs = out if return_probs else (out, None)
    o = _rotation.unrotate_output(o, ckv.rotation[:, :, 1]).astype(q.dtype)
    return (o, probs) if return_probs else o
  if q.ndim == 4:
    xla_why = f"the chunked path attends one query token per row (q [B, N, H]), got q of shape {q.shape}"
  elif return_probs:
    xla_why = "the chunked path does not return per-slot probabilities (H2O)"
  else:
    xla_why = None
  match dispatch.resolve(implementation, interpret, op="attend", pallas_why=_fused.why_unsupported(
      q, ckv, return_probs) if implementation in (None, "pallas") else None, xla_why=xla_why):
    case "pallas":
      return _fused.attend(q, ckv, scale=scale, interpret=interpret)
    case "xla":
      return _chunked.attend(q, ckv, scale=scale)   # validates ckv and q itself
  return _attend(q, ckv, scale, return_probs)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, lengths: jax.Array,
                    scale: float | None = None) -> jax.Array:
  """Reference attention of q [B, N, H] over a dense cache k, v [B, K, S, H] with lengths i32[B] or i32[B, K]."""
  b, n, h = q.shape
  kh, s = k.shape[1], k.shape[2]
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  qg = (q.astype(jnp.float32) * scale).reshape(b, kh, n // kh, h)
  sc = jnp.einsum("BKGH,BKSH->BKGS", qg, k.astype(jnp.float32))
  lengths = jnp.asarray(lengths)
  lk = lengths[:, None] if lengths.ndim == 1 else lengths
  mask = jnp.arange(s)[None, None, :] < lk[..., None]
  p = masked_softmax(sc, mask[:, :, None])
  return jnp.einsum("BKGS,BKSH->BKGH", p, v.astype(jnp.float32)).reshape(b, n, h).astype(q.dtype)
