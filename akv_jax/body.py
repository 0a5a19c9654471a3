"""Addressing the body of a compressed cache: per-head views and flat pool writes.

The body is stored either per head ([B, K, M, ...] leaves) or as one page pool per row ([B, 1, P * Q, ...]
leaves plus a page table). Readers want per-head logical slots; writers want flat pool rows. This module is the
one place that knows both, so attention, decompression and decoding never branch on the layout themselves.
Every leaf of the body (codes, scales, zeros, positions, bf16 rows) has its slot axis at 2; a leaf may hold fewer
rows than slots (channel-grouped key scales hold one row per `group` slots), which `rows_per_slot` accounts for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from akv_jax.cache import CompressedKV, QuantizedTensor
from akv_jax.quant import dequantize


def _pool_slots(ckv: CompressedKV) -> int:
  """Slots of one row's body storage, all heads together."""
  return ckv.body_pos.shape[1] * ckv.body_pos.shape[2]


def head_capacity(ckv: CompressedKV) -> jax.Array:
  """i32[B, K]: logical body slots each head owns."""
  if ckv.page_table is None:
    return jnp.full((ckv.batch, ckv.num_kv_heads), ckv.body_pos.shape[2], jnp.int32)
  return jnp.sum(ckv.page_table >= 0, axis=-1).astype(jnp.int32) * ckv.page_size


def pool_index(ckv: CompressedKV, slot: jax.Array) -> jax.Array:
  """Flat pool slot of logical body slot `slot` i32[B, K, ...] of each head (clamped into range)."""
  b, kh = ckv.batch, ckv.num_kv_heads
  if ckv.page_table is None:
    m = ckv.body_pos.shape[2]
    head = jnp.arange(kh, dtype=jnp.int32).reshape((1, kh) + (1,) * (slot.ndim - 2))
    return head * m + jnp.clip(slot, 0, max(m - 1, 0))
  q = ckv.page_size
  page = jnp.clip(slot // q, 0, ckv.page_table.shape[-1] - 1)
  table = ckv.page_table.reshape(b, kh, -1)
  owner = jnp.take_along_axis(table, page.reshape(b, kh, -1), axis=-1).reshape(page.shape)
  return jnp.maximum(owner, 0) * q + slot % q


def to_heads(ckv: CompressedKV, leaf: jax.Array) -> jax.Array:
  """A body leaf [B, K, M', ...] or pooled [B, 1, P * Q', ...] -> per-head logical view [B, K, M', ...]."""
  if ckv.page_table is None:
    return leaf
  b = leaf.shape[0]
  pages = _pool_slots(ckv) // ckv.page_size
  rows = leaf.shape[2] // pages
  pooled = leaf[:, 0].reshape(b, pages, rows, *leaf.shape[3:])
  gathered = jax.vmap(lambda x, t: x[jnp.maximum(t, 0)])(pooled, ckv.page_table)
  return gathered.reshape(b, ckv.num_kv_heads, -1, *leaf.shape[3:])


def dequantize_heads(ckv: CompressedKV, body, dtype=jnp.float32) -> jax.Array:
  """Body keys or values as a per-head [B, K, M, H] array in `dtype`."""
  heads = jax.tree_util.tree_map(lambda leaf: to_heads(ckv, leaf), body)
  if isinstance(heads, QuantizedTensor):
    return dequantize(heads, dtype, channels=ckv.outlier_channels if heads.outliers is not None else None)
  return heads.astype(dtype)


def head_positions(ckv: CompressedKV) -> jax.Array:
  """i32[B, K, M] original positions of logical body slots (-1 where empty)."""
  return to_heads(ckv, ckv.body_pos)


def flatten_leaf(leaf: jax.Array) -> jax.Array:
  """[B, K, M', ...] or [B, 1, P * Q', ...] -> [B, rows, ...] flat pool rows."""
  return leaf.reshape(leaf.shape[0], leaf.shape[1] * leaf.shape[2], *leaf.shape[3:])


def set_at(x: jax.Array, index: tuple, values: jax.Array) -> jax.Array:
  """x.at[index].set(values, mode="drop"), with 16-bit floats written through their bit patterns.

  XLA's CPU backend widens a bf16/f16 scatter to f32 (a convert of the whole operand there and back), which made
  appending one token to a 4k bf16 cache cost 30x what the write itself does; a uint16 scatter of the same bits
  is written in place. Bit-identical either way: the values are rounded to x's dtype first.
  """
  values = values.astype(x.dtype)
  if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype.itemsize == 2:
    bits = jax.lax.bitcast_convert_type(x, jnp.uint16).at[index].set(
        jax.lax.bitcast_convert_type(values, jnp.uint16), mode="drop")
    return jax.lax.bitcast_convert_type(bits, x.dtype)
  return x.at[index].set(values, mode="drop")


def set_slot(x: jax.Array, slot: jax.Array, value: jax.Array, enabled: jax.Array) -> jax.Array:
  """x [B, K, R, ...]: writes value [B, K, ...] at slot i32[B, K] where enabled bool[B, K]."""
  b, kh, r = x.shape[:3]
  idx = jnp.where(enabled, slot, r)
  bi, ki = jnp.meshgrid(jnp.arange(b), jnp.arange(kh), indexing="ij")
  return set_at(x, (bi, ki, idx), value)


def get_slot(x: jax.Array, slot: jax.Array) -> jax.Array:
  """x [B, K, R, ...] at slot i32[B, K] (clamped into range) -> [B, K, ...]."""
  idx = jnp.clip(slot, 0, x.shape[2] - 1).reshape(slot.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, idx, axis=2)[:, :, 0]


def shift(x: jax.Array, n: int, enabled: jax.Array, axis: int = 2) -> jax.Array:
  """Drops the first n slots along `axis` (filling the tail with zeros / -1 for ints) where enabled bool[B, K]."""
  fill = -1 if jnp.issubdtype(x.dtype, jnp.integer) else 0
  tail = jnp.full(x.shape[:axis] + (n,) + x.shape[axis + 1:], fill, x.dtype)
  shifted = jnp.concatenate([jax.lax.slice_in_dim(x, n, x.shape[axis], axis=axis), tail], axis=axis)
  return jnp.where(enabled.reshape(enabled.shape + (1,) * (x.ndim - 2)), shifted, x)


def write_rows(flat: jax.Array, rows: jax.Array, slots: jax.Array, enabled: jax.Array,
               total_slots: int) -> jax.Array:
  """Writes `rows` [B, K, n, ...] into a flat leaf [B, rows_total, ...] at pool slots `slots` i32[B, K, n].

  A leaf holding fewer rows than slots (channel-grouped key scales: one row per group) is written at
  slot // (slots / rows); callers pass `rows` at the leaf's own granularity. Heads whose `enabled` bool[B, K] is
  False write nothing (their indices go out of range and are dropped), which keeps per-head conditional writes
  branch-free.
  """
  rows_total = flat.shape[1]
  if rows_total == 0:  # a body with no slots (StreamingLLM keeps only sinks and the window)
    return flat
  idx = slots // (total_slots // rows_total)
  idx = jnp.where(enabled[..., None], idx, rows_total)
  bidx = jnp.broadcast_to(jnp.arange(flat.shape[0])[:, None, None], idx.shape)
  return set_at(flat, (bidx, idx), rows)


def gather_values(ckv: CompressedKV, slots: jax.Array) -> jax.Array:
  """Body values at logical slots i32[B, K, n] of each head, dequantized: f32[B, K, n, H].

  Reads only those n rows (codes, scales and mins of values quantized per token, or bf16 rows), wherever the
  layout keeps them; used for the few recent slots whose values already left the bf16 window.
  """
  flat = pool_index(ckv, slots)                                           # [B, K, n] flat pool rows
  bidx = jnp.arange(ckv.batch)[:, None, None]
  v = ckv.body_v

  def rows(leaf):
    return flatten_leaf(leaf)[bidx, flat]

  if isinstance(v, QuantizedTensor):
    if v.axis != "token":
      raise ValueError(f"gather_values reads values quantized per token; these are quantized per {v.axis!r}")
    return dequantize(QuantizedTensor(codes=rows(v.codes), scale=rows(v.scale), zero=rows(v.zero),
                                      bits=v.bits, group=v.group, axis=v.axis))
  return rows(v).astype(jnp.float32)
