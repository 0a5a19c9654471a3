"""Decode attention in XLA for one query token, reading the compressed body a chunk at a time.

The reference (`attention._attend`) dequantizes the whole body to f32 before its two einsums, so on a CPU it
moves more bytes than a dense bf16 cache would and compression buys no speed. This path keeps the work in
cache-sized pieces: a loop over chunks of `chunk` body slots with an online softmax, and within a chunk the packed
codes are unpacked one sub-block at a time (byte j holds head-dim elements j, j + H/n, ...; see QuantizedTensor),
so each sub-block is a contiguous head-dim range that meets its slice of the query (keys) or of the output
(values) in a small dot, with no interleaving reshape. Chunks past the longest row's key fill are not visited.

It is what `akv.attend(..., implementation="xla")` runs for one query token without probabilities; the
reference stays the definition tests compare against.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from akv_jax import body as _body
from akv_jax import outliers as _outliers
from akv_jax import validation
from akv_jax.cache import CompressedKV, QuantizedTensor
from akv_jax.quant import dequantize
from pallas_kernels import quant_reference as _quant_ref

_MASKED = -1e30


def _sub_blocks(codes: jax.Array, bits: int) -> list[jax.Array]:
  """u8[..., H*bits/8] -> the n sub-blocks f32[..., H/n], sub-block i = head dims [i H/n, (i+1) H/n)
  (quant_reference.sub_blocks: n = 8 / bits, or 8 for 3-bit codes)."""
  return [c.astype(jnp.float32) for c in _quant_ref.sub_blocks(codes, bits)]


def _dot(eq: str, a: jax.Array, b: jax.Array) -> jax.Array:
  """einsum(eq, a f32 [B, K, G, ...], b) in f32, with a 16-bit float b read as it is stored.

  A bf16/f16 operand meets a split into two 16-bit halves, a = hi + lo (stacked along G, one dot), whose products
  with it are exact in f32: the result differs from the f32 dot only by the residual a - hi - lo (about 2^-16
  relative). On a CPU this reads the cache at its stored width (bf16 dots run on the vector units' native
  instructions) instead of materialising an f32 copy of every chunk: 2.6x faster on a 4k bf16 cache.
  """
  if b.dtype not in (jnp.bfloat16, jnp.float16):
    return jnp.einsum(eq, a, b.astype(jnp.float32))
  hi = a.astype(b.dtype)
  lo = (a - hi.astype(jnp.float32)).astype(b.dtype)
  out = jnp.einsum(eq, jnp.concatenate([hi, lo], axis=2), b, preferred_element_type=jnp.float32)
  g = a.shape[2]
  return out[:, :, :g] + out[:, :, g:]


def _slice(x: jax.Array, start, size: int) -> jax.Array:
  return jax.lax.dynamic_slice_in_dim(x, start, size, axis=2)


class _PagedRows:
  """Reads rows of a paged body leaf through the page table, one chunk at a time (never the whole pool)."""

  def __init__(self, ckv: CompressedKV):
    self.ckv = ckv

  def __call__(self, leaf: jax.Array, start, size: int) -> jax.Array:
    ckv = self.ckv
    slots_per_row = _body.flatten_leaf(ckv.body_pos).shape[1] // _body.flatten_leaf(leaf).shape[1]
    slot = start * slots_per_row + jnp.arange(size, dtype=jnp.int32) * slots_per_row   # first slot of each row
    slot = jnp.broadcast_to(slot, (ckv.batch, ckv.num_kv_heads, size))
    flat = _body.pool_index(ckv, slot) // slots_per_row
    return _body.flatten_leaf(leaf)[jnp.arange(ckv.batch)[:, None, None], flat]


def _scores(qg: jax.Array, k, start, c: int, _slice=_slice, q_out: jax.Array | None = None) -> jax.Array:
  """qg f32[B, K, G, H] against body keys of slots [start, start + c) -> f32[B, K, G, c].

  `_slice(leaf, first_row, rows)` reads rows of a body leaf (a dynamic slice, or a page-table gather).
  q_out: f32[B, K, G, O] the queries at the keys' outlier channels (akv_jax.outliers), whose codes decode to 0.
  """
  if not isinstance(k, QuantizedTensor):
    return _dot("BKGH,BKSH->BKGS", qg, _slice(k, start, c))
  if k.axis != "channel":
    rows = QuantizedTensor(codes=_slice(k.codes, start, c), scale=_slice(k.scale, start, c),
                           zero=_slice(k.zero, start, c), bits=k.bits, group=k.group, axis=k.axis)
    return jnp.einsum("BKGH,BKSH->BKGS", qg, dequantize(rows))
  b, kh, _, h = qg.shape
  gk = k.group
  scale = _slice(k.scale, start // gk, c // gk).astype(jnp.float32)[:, :, :, None]  # [B, K, c/gk, 1, H]
  zero = _slice(k.zero, start // gk, c // gk).astype(jnp.float32)[:, :, :, None]
  subs = _sub_blocks(_slice(k.codes, start, c), k.bits)
  w = h // len(subs)
  s = 0.0
  for i, ci in enumerate(subs):
    cols = slice(i * w, (i + 1) * w)
    ki = ci.reshape(b, kh, c // gk, gk, w) * scale[..., cols] + zero[..., cols]
    s = s + jnp.einsum("BKGH,BKSH->BKGS", qg[..., cols], ki.reshape(b, kh, c, w))
  if k.outliers is not None:
    s = s + _dot("BKGH,BKSH->BKGS", q_out, _slice(k.outliers, start, c))
  return s


def _mix(p: jax.Array, v, start, c: int, _slice=_slice) -> jax.Array:
  """p f32[B, K, G, c] times body values of slots [start, start + c) -> f32[B, K, G, H]."""
  if not isinstance(v, QuantizedTensor):
    return _dot("BKGS,BKSH->BKGH", p, _slice(v, start, c))
  if v.axis != "token":  # policies quantize values per token only (KIVI); see Policy
    raise ValueError(f"chunked attention reads values quantized per token; these are per {v.axis!r}")
  b, kh = p.shape[:2]
  gv = v.group
  scale = _slice(v.scale, start, c).astype(jnp.float32)                  # [B, K, c, H/gv]
  zero = _slice(v.zero, start, c).astype(jnp.float32)
  subs = _sub_blocks(_slice(v.codes, start, c), v.bits)
  w = v.shape[-1] // len(subs)
  outs = []
  for i, ci in enumerate(subs):
    if w >= gv:   # this sub-block spans w / gv whole scale columns
      cols = slice(i * w // gv, (i + 1) * w // gv)
      vi = (ci.reshape(b, kh, c, w // gv, gv) * scale[..., cols, None] + zero[..., cols, None]).reshape(b, kh, c, w)
    else:         # one scale column covers gv / w sub-blocks
      col = slice(i * w // gv, i * w // gv + 1)
      vi = ci * scale[..., col] + zero[..., col]
    outs.append(jnp.einsum("BKGS,BKSH->BKGH", p, vi))
  return jnp.concatenate(outs, axis=-1)


def _partial(s: jax.Array, valid: jax.Array):
  """Masked scores f32[B, K, G, S'] -> (row max, exp weights, row sum)."""
  s = jnp.where(valid[:, :, None], s, _MASKED)
  m = jnp.max(s, axis=-1)
  p = jnp.where(valid[:, :, None], jnp.exp(s - m[..., None]), 0.0)
  return m, p, jnp.sum(p, axis=-1)


# A chunk's dequantized f32 keys or values, B * K * chunk * H elements, are kept near 2^20 (4 MB): measured on a
# 2-core CPU at S = 32k, B = 4 ran 1.7x faster with 256-slot chunks than with 1024 (and B = 1 best at 1024).
_CHUNK_ELEMENTS = 1 << 20


def default_chunk(b: int, kh: int, h: int) -> int:
  return int(min(4096, max(64, 1 << max(0, (_CHUNK_ELEMENTS // (b * kh * h)).bit_length() - 1))))


def _default_chunk(ckv: CompressedKV, b: int, kh: int, h: int) -> int:
  """A bf16 per-head body is read in one piece: XLA's CPU backend widens a dynamic slice of a 16-bit float array
  to f32 (a convert of the whole body, hoisted out of the loop), which made a 4k bf16 body 5x slower to attend
  chunk by chunk than whole; the bf16 dots need no f32 copy, so one piece costs only the f32 scores. Quantized
  bodies are sliced as u8 codes and dequantized a chunk at a time."""
  if not ckv.paged and not isinstance(ckv.body_k, QuantizedTensor) and not isinstance(ckv.body_v, QuantizedTensor):
    return ckv.body_capacity
  return default_chunk(b, kh, h)


def attend(q: jax.Array, ckv: CompressedKV, *, scale: float | None = None, chunk: int | None = None) -> jax.Array:
  """Attention of q [B, N, H] (one token per row) over ckv -> [B, N, H] in q's dtype.

  Args:
    chunk: body slots per loop step (static; default: the whole body when it is bf16 rows, else
      `default_chunk`), rounded down to whole key groups and to the body's capacity.
  """
  b, kh, h = validation.compressed(ckv)
  validation.queries(q, b, kh, h, name="q", ranks=(3,))
  n = q.shape[1]
  g = n // kh
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  qg = q.astype(jnp.float32).reshape(b, kh, g, h) * scale

  # Sinks, then the recent window; its first value_fill - key_fill values already sit in the body.
  m_cap = ckv.body_capacity
  key_group = (ckv.body_k.group if isinstance(ckv.body_k, QuantizedTensor) and ckv.body_k.axis == "channel"
               else 1)
  r = ckv.recent_capacity
  f = min(r, key_group) if (key_group > 1 and m_cap) else 0
  recent_v = ckv.recent_v.astype(jnp.float32)
  if f:
    slot = jnp.arange(f)
    ahead = slot[None, None, :] < (ckv.value_fill - ckv.key_fill)[..., None]
    patch = _body.gather_values(ckv, ckv.key_fill[..., None] + slot)
    recent_v = jnp.concatenate([jnp.where(ahead[..., None], patch, recent_v[:, :, :f]), recent_v[:, :, f:]], 2)
  z = ckv.sink_k.shape[2]
  keys = jnp.concatenate([ckv.sink_k, ckv.recent_k], axis=2).astype(jnp.float32)
  values = jnp.concatenate([ckv.sink_v.astype(jnp.float32), recent_v], axis=2)
  valid = jnp.concatenate([jnp.broadcast_to(jnp.arange(z)[None, None] < ckv.sink_fill[:, None, None], (b, kh, z)),
                           jnp.arange(r)[None, None] < ckv.recent_fill[..., None]], axis=2)
  m, p, l = _partial(jnp.einsum("BKGH,BKSH->BKGS", qg, keys), valid)
  acc = jnp.einsum("BKGS,BKSH->BKGH", p, values)

  if m_cap:
    body_k, body_v = ckv.body_k, ckv.body_v
    rows = _PagedRows(ckv) if ckv.paged else _slice
    chunk = _default_chunk(ckv, b, kh, h) if chunk is None else chunk
    c = max(key_group, min(chunk, m_cap) // key_group * key_group)
    fill = ckv.key_fill
    q_out = None
    if isinstance(body_k, QuantizedTensor) and body_k.outliers is not None:
      q_out = _outliers.queries_at(qg, ckv.outlier_channels)

    def step(i, carry):
      m, l, acc = carry
      start = jnp.minimum(i * c, m_cap - c)      # the last chunk may overlap the one before: mask the overlap
      slot = start + jnp.arange(c)
      ok = (slot[None, None] >= i * c) & (slot[None, None] < fill[..., None])
      m_c, p, l_c = _partial(_scores(qg, body_k, start, c, rows, q_out), ok)
      m_new = jnp.maximum(m, m_c)
      a, a_c = jnp.exp(m - m_new), jnp.exp(m_c - m_new)
      return m_new, l * a + l_c * a_c, acc * a[..., None] + _mix(p, body_v, start, c, rows) * a_c[..., None]

    chunks = (jnp.max(fill) + c - 1) // c
    m, l, acc = jax.lax.fori_loop(0, chunks, step, (m, l, acc))
  out = acc / jnp.where(l > 0, l, 1.0)[..., None]
  return out.reshape(b, n, h).astype(q.dtype)
