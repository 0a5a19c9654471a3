"""Fused decode attention over a compressed KV cache (Pallas, Triton backend), with its plain-jnp reference.

One query token per row; all G query heads of a kv head share a program (padded to 16 rows, the smallest
tensor-core dot; only the G real rows are written out). Each program reads one slice of the cache directly in its
stored form and keeps an online softmax in f32 (log2 units, exp2):

  sinks    bf16 [Z, H]                          slots [0, sink_len)
  body     packed keys (per-channel groups of key_group tokens) and packed values (per-token groups of
           value_group channels), or bf16 rows; per head [M, ...] or a page pool read through a page table;
           slots [0, body_len), `Format.block` slots per loop step
  patch    recent keys [0, patch_len) whose values already left the bf16 window (KIVI's residual rule: a value is
           quantized one token at a time, its key a whole group later); their values come in `patch_v`
  recent   bf16 [R, H]                          slots [patch_len, recent_len)

Designed for bandwidth (decode reads every byte once and does little arithmetic per byte):
- Tensor-core dots with 16-bit operands and f32 accumulation. Quantized keys are dequantized in registers to f16
  (one FMA per code) and meet the f16 query in one dot per packed sub-block over the whole step; quantized values
  stay integer codes (exact in f16): the per-token scale is folded into the probabilities and the per-token min
  enters as sum_t p_t min_t, so only p * scale is rounded. bf16 parts (sinks, window, bf16 bodies) meet the query
  and the probabilities split into two bf16 halves, so their products are exact to ~2^-16.
  Against the f32 reference that leaves the quantized body's f16 rounding: about 2^-11 of each dequantized key
  and of p * scale (tests: 2e-3; bf16-only caches 2e-4), far below the quantization error itself.
- Codes are unpacked with shifts, one AND/OR and one add (OR into the mantissa of 2^23, subtract 2^23), not an
  integer-to-float conversion; scales and mins are loaded as vectors, per step.
- 128 slots per loop step by default (4 key groups), and the split count is chosen from occupancy.

Packed codes: n = 8 / bits codes per byte; byte j of a row holds head-dim elements j, j + H/n, ..., so sub-block
i of the unpacked row is the contiguous head-dim range [i H/n, (i + 1) H/n): q.k is a sum of n dots over ref
slices of q, and each value chunk (one byte range, one scale column) writes its own output columns, with no value
slicing or concatenation (which Triton rejects). 3-bit codes are a 2-bit plane and a 1-bit plane side by side
(quant_reference.pack): 8 sub-blocks of H/8, each from three byte ranges (H >= 128, so a sub-block fills a dot);
where a sub-block is narrower than a value scale column, values are read two sub-blocks at a time (`_paired_codes`),
so each value dot is wide enough to share among the warps.

Long caches split along the sequence (flash-decoding): program j of (b, k) takes the j-th share of body and
recent blocks (split 0 also the sinks and the patch) and writes an unnormalized partial output with its row max
and sum; `combine` merges the splits in one XLA fusion (with one split, the kernel normalizes its own output). Blocks past a row's length are never visited, and the last
block is read with masked loads, since the Triton backend does not mask partial blocks.

This module takes plain arrays and never imports akv_jax; akv_jax.attention maps a CompressedKV onto it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import quant_reference
from pallas_kernels.dots import dot_nn, dot_nt

_MASKED = -1e30          # finite, so a fully masked block cannot produce inf - inf = NaN
_MIN_ROWS = 16           # smallest dot dimension on the Triton backend: the G query heads are padded to it
_LOG2E = 1.4426950408889634
_MAGIC_BITS = 0x6400      # bits of f16 1024: a code < 1024 OR-ed into its mantissa reads as 1024 + code, exactly
_MAGIC = 1024.0
# Occupancy model for the split count (H100 / H200: 132 SMs). CTAs per SM: the kernel compiles to about 250
# registers x 128 threads (experiments/results/kernel_report), which leaves room for 2.
_SMS = 132
_CTAS_PER_SM = 2
QUANT_BITS = quant_reference.SUPPORTED_BITS
RAW = 16                 # "bits" of a bf16 (unquantized) body


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
  """Static layout of the body a kernel reads (hashable: a static argument).

  Attributes:
    key_bits: 2, 4 or 8 for packed keys quantized per channel, or 16 for bf16 rows.
    key_group: tokens per key scale row (KIVI keys: one scale per channel per group); also the body block.
    value_bits: 2, 4 or 8 for packed values quantized per token, or 16 for bf16 rows.
    value_group: channels per value scale column.
    key_outliers: O outlier key channels held in bf16 beside quantized keys ([M, O], their codes decode to 0):
      each adds q[c] * k[c] to a slot's score.
    page_size: tokens per page when the body is a page pool read through a page table, else 0.
    block: body slots per loop step: a power of 2 >= 16 and a multiple of key_group (quantized keys) and of
      page_size (paged bodies: a step gathers block / page_size pages).
  """

  key_bits: int = RAW
  key_group: int = 32
  value_bits: int = RAW
  value_group: int = 32
  key_outliers: int = 0
  page_size: int = 0
  block: int = 128

  def __post_init__(self):
    for name in ("key_bits", "value_bits"):
      if getattr(self, name) not in QUANT_BITS + (RAW,):
        raise ValueError(f"{name}={getattr(self, name)} is not supported; use one of {QUANT_BITS + (RAW,)}")
    for name in ("key_group", "value_group", "block"):
      v = getattr(self, name)
      if v < 1 or v & (v - 1):
        raise ValueError(f"{name}={v} must be a power of 2")
    if self.page_size and (self.page_size & (self.page_size - 1) or self.page_size < _MIN_ROWS):
      raise ValueError(f"page_size={self.page_size} must be a power of 2 >= {_MIN_ROWS}")
    if self.page_size and self.key_bits != RAW and self.page_size != self.key_group:
      raise ValueError(f"page_size={self.page_size} must equal key_group={self.key_group} for quantized keys "
                       "(a page is one key group)")
    if self.block < _MIN_ROWS:
      raise ValueError(f"block={self.block} must be >= {_MIN_ROWS}")
    if self.key_outliers < 0 or (self.key_outliers and self.key_bits == RAW):
      raise ValueError(f"key_outliers={self.key_outliers} must be >= 0, and 0 for bf16 keys "
                       f"(key_bits={self.key_bits})")
    for name, unit in (("key_group", self.key_group if self.key_bits != RAW else 1), ("page_size", self.page_size)):
      if unit and self.block % unit:
        raise ValueError(f"block={self.block} must be a multiple of {name}={unit}")

  def paired_values(self, h: int) -> bool:
    """3-bit values whose sub-blocks are narrower than a scale column: two neighbouring sub-blocks (the two halves
    of the 2-bit plane at one shift) are read as one chunk, so a chunk's dot is 2 H/8 channels wide. A [16, 16]
    output (H = 128) is too small to share out among the warps of a program: each would compute all of it."""
    return self.value_bits == 3 and 2 * (h // 8) <= self.value_group

  def chunk(self, h: int) -> int:
    """Output channels per value chunk: one byte range of the packed values under one scale column (two
    sub-blocks for paired 3-bit values)."""
    if self.value_bits == RAW:
      return h
    if self.paired_values(h):
      return 2 * (h // 8)
    return min(h // quant_reference.sub_block_count(self.value_bits), self.value_group)


# ------------------------------------------------------------------------------------------------ kernel


def _split(x: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """f32 x -> (hi, lo) in a 16-bit dtype with hi + lo = x up to ~2^-16 relative: against exact 16-bit operands
  (bf16 keys and values) two tensor-core dots then give the f32 product to that accuracy."""
  hi = x.astype(dtype)
  return hi, (x - hi.astype(jnp.float32)).astype(dtype)


def _load_packed(load, bits: int, h: int, off: int, width: int) -> tuple[jax.Array, ...]:
  """The byte ranges (int32) that the codes of columns [off, off + width) of every sub-block come from:
  load(col, width) -> [rows, width]. One range for 2, 4 and 8 bits; for 3 bits three, the two halves of the
  2-bit plane and the 1-bit plane, each H/8 bytes wide."""
  if bits != 3:
    return (load(off, width).astype(jnp.int32),)
  w = h // 8
  return tuple(load(plane * w + off, width).astype(jnp.int32) for plane in range(3))


def _paired_codes(low: jax.Array, high: jax.Array, pair: int) -> jax.Array:
  """3-bit codes of sub-blocks 2 pair and 2 pair + 1 side by side, [rows, 2 H/8] as exact f16, from the whole
  2-bit plane `low` (int32 [rows, H/4]: its two halves are those sub-blocks' low bits at one shift) and the 1-bit
  plane read twice over, `high` (int32 [rows, H/4], column c from byte c % (H/8)): the high bit of column c is bit
  2 pair + c // (H/8)."""
  w = low.shape[1] // 2
  shift = 2 * pair + (jnp.arange(2 * w) >= w).astype(jnp.int32)
  c = ((low >> (2 * pair)) & 3) | (((high >> shift[None, :]) & 1) << 2)
  return jax.lax.bitcast_convert_type((c | _MAGIC_BITS).astype(jnp.int16), jnp.float16) - _MAGIC


def _codes(packed: tuple[jax.Array, ...], index: int, bits: int) -> jax.Array:
  """Sub-block `index` of packed codes (from `_load_packed`) as exact f16: the code is OR-ed into the mantissa
  of f16 1024 (bits 0x6400) and 1024 subtracted, a logic op and a paired half add instead of an int-to-float
  conversion. A 3-bit code is its low bits from half index % 2 of the 2-bit plane and its high bit from the 1-bit
  plane: three more shifts and masks."""
  if bits == 3:
    c = ((packed[index % 2] >> (2 * (index // 2))) & 3) | (((packed[2] >> index) & 1) << 2)
  else:
    c = (packed[0] >> (index * bits)) & ((1 << bits) - 1)
  return jax.lax.bitcast_convert_type((c | _MAGIC_BITS).astype(jnp.int16), jnp.float16) - _MAGIC


class _Rows:
  """Loads of `rows` consecutive logical body slots starting at `first` (valid bool[rows]): contiguous ref slices
  for a per-head body, row gathers through the page table for a pooled one."""

  def __init__(self, fmt: Format, table_ref, first, rows: int, valid):
    self.fmt, self.table_ref = fmt, table_ref
    self.first, self.rows, self.valid = first, rows, valid
    self.slot = None
    if fmt.page_size:
      logical = first + jnp.arange(rows)
      self.slot = self._owner(logical // fmt.page_size) * fmt.page_size + logical % fmt.page_size

  def _owner(self, page):
    """Pool page of logical pages i32[n] (clamped: pages past the table are masked by the caller)."""
    page = jnp.minimum(page, self.table_ref.shape[0] - 1)
    return jnp.maximum(plgpu.load(self.table_ref.at[page]), 0)

  def groups(self, ref, col: int, width: int):
    """ref[g, col:col + width] for the key groups g these slots span (one row per key_group slots)."""
    gk = self.fmt.key_group
    n = self.rows // gk
    if self.slot is None:
      ok = self.first // gk + jnp.arange(n) < ref.shape[0]
      return plgpu.load(ref.at[pl.ds(self.first // gk, n), pl.ds(col, width)],
                        mask=jnp.broadcast_to(ok[:, None], (n, width)), other=0)
    row = self._owner(self.first // gk + jnp.arange(n))    # a page is one key group
    return plgpu.load(ref.at[row[:, None], col + jnp.arange(width)[None, :]])

  def column(self, ref, col: int):
    """ref[slot, col] for each slot -> [rows] (zeros at invalid slots)."""
    col = jnp.asarray(col, jnp.int32)   # (a Python int index trips the interpreter's load rule)
    if self.slot is None:
      return plgpu.load(ref.at[pl.ds(self.first, self.rows), col], mask=self.valid, other=0)
    return plgpu.load(ref.at[jnp.minimum(self.slot, ref.shape[0] - 1), col], mask=self.valid, other=0)

  def gather(self, ref, cols: jax.Array):
    """ref[slot, cols] for each slot and the column indices i32[width], masked to valid slots."""
    width = cols.shape[0]
    mask = jnp.broadcast_to(self.valid[:, None], (self.rows, width))
    row = self.first + jnp.arange(self.rows) if self.slot is None else jnp.minimum(self.slot, ref.shape[0] - 1)
    return plgpu.load(ref.at[row[:, None], cols[None, :]], mask=mask, other=0)

  def __call__(self, ref, col: int, width: int):
    """ref[slot, col:col + width] for each slot, masked to valid slots (zeros elsewhere)."""
    mask = jnp.broadcast_to(self.valid[:, None], (self.rows, width))
    if self.slot is None:
      return plgpu.load(ref.at[pl.ds(self.first, self.rows), pl.ds(col, width)], mask=mask, other=0)
    row = jnp.minimum(self.slot, ref.shape[0] - 1)
    return plgpu.load(ref.at[row[:, None], col + jnp.arange(width)[None, :]], mask=mask, other=0)


def _chunks(fmt: Format, h: int) -> list[tuple[int, int, int]]:
  """The output column chunks (byte offset, sub-block, first channel): each chunk is `fmt.chunk(h)` channels that
  one value scale column and one byte range of the packed codes cover (paired 3-bit values: sub-block is the
  pair j, sub-blocks 2j and 2j + 1)."""
  if fmt.value_bits == RAW:
    return [(0, 0, 0)]
  if fmt.paired_values(h):
    u = fmt.chunk(h)
    return [(0, j, j * u) for j in range(h // u)]
  n = quant_reference.sub_block_count(fmt.value_bits)
  sub, u = h // n, fmt.chunk(h)
  return [(off, i, i * sub + off) for off in range(0, sub, u) for i in range(n)]


def _update(state, s, valid, mix):
  """One online-softmax step over scores s f32[Gp, rows] (log2 units; valid bool[rows]); mix(p) gives each output
  chunk's p @ v."""
  m, l, accs = state
  s = jnp.where(valid[None, :], s, _MASKED)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.where(valid[None, :], jnp.exp2(s - m_new[:, None]), 0.0)
  l = l * alpha + jnp.sum(p, axis=1)
  return m_new, l, tuple(a * alpha[:, None] + pv for a, pv in zip(accs, mix(p)))


def _kernel(fmt: Format, splits: int, side_block: int, g: int, *refs):
  # Refs, per program (b, k, j):
  #   q_ref [Gp, H] f32 (scaled); lens_ref i32[4] = (sink_len, body_len, patch_len, recent_len)
  #   sink_k_ref, sink_v_ref [Z, H]; recent_k_ref, recent_v_ref [R, H]; patch_v_ref [F, H]
  #   body key refs: codes u8[M, H*kb/8], scale f16[M/gk, H], zero f16[M/gk, H]  (or one bf16 [M, H]),
  #     then outliers bf16[M, O] and their queries q_out_ref f32[Gp, O] (scaled) when fmt.key_outliers
  #   body value refs: codes u8[M, H*vb/8], scale f16[M, H/gv], zero f16[M, H/gv] (or one bf16 [M, H])
  #   table_ref i32[P_max] when paged; then o_ref [Gp, H] f32 (rows < G written), m_ref, l_ref f32[Gp].
  it = iter(refs)
  q_ref, lens_ref, sink_k_ref, sink_v_ref, recent_k_ref, recent_v_ref, patch_v_ref = (next(it) for _ in range(7))
  k_refs = (next(it),) if fmt.key_bits == RAW else (next(it), next(it), next(it))
  out_ref, q_out_ref = (next(it), next(it)) if fmt.key_outliers else (None, None)
  v_refs = (next(it),) if fmt.value_bits == RAW else (next(it), next(it), next(it))
  table_ref = next(it) if fmt.page_size else None
  o_ref, m_ref, l_ref = next(it), next(it), next(it)

  j = pl.program_id(2)
  gp, h = q_ref.shape
  chunks = _chunks(fmt, h)
  u = fmt.chunk(h)
  sink_len, body_len, patch_len, recent_len = lens_ref[0], lens_ref[1], lens_ref[2], lens_ref[3]
  q = q_ref[...] * _LOG2E                                    # scores in log2 units: the softmax uses exp2
  q_hi, q_lo = _split(q, jnp.bfloat16)                       # for the bf16 keys (exact products)

  def raw_scores(k):                                         # k bf16 [rows, H] -> f32[Gp, rows]
    return dot_nt(q_hi, k) + dot_nt(q_lo, k)

  def raw_mix(load_v):                                       # load_v(col, width) -> bf16 [rows, width]
    def mix(p):
      p_hi, p_lo = _split(p, jnp.bfloat16)
      vs = [load_v(first, u) for _, _, first in chunks]
      # f32 values (the patch: values already dequantized from the body) stay f32; the patch is one key group.
      return [dot_nn(p, v) if v.dtype == jnp.float32 else dot_nn(p_hi, v) + dot_nn(p_lo, v) for v in vs]
    return mix

  def side_step(state, k_ref, v_ref, start, lo, hi):
    """Slots [start, start + side_block) of a bf16 segment, keeping those in [lo, hi)."""
    slot = start + jnp.arange(side_block)
    valid = (slot >= lo) & (slot < hi)
    mask = lambda w: jnp.broadcast_to(valid[:, None], (side_block, w))  # noqa: E731
    k = plgpu.load(k_ref.at[pl.ds(start, side_block), :], mask=mask(h), other=0)
    load_v = lambda col, w: plgpu.load(v_ref.at[pl.ds(start, side_block), pl.ds(col, w)], mask=mask(w),  # noqa: E731
                                       other=0)
    return _update(state, raw_scores(k), valid, raw_mix(load_v))

  if fmt.key_bits != RAW:
    nk = quant_reference.sub_block_count(fmt.key_bits)
    ksub = h // nk
    q16 = [(q_ref[:, pl.ds(i * ksub, ksub)] * _LOG2E).astype(jnp.float16) for i in range(nk)]

  t = fmt.block

  def body_step(i, state):
    first = i * t
    valid = first + jnp.arange(t) < body_len
    rows = _Rows(fmt, table_ref, first, t, valid)
    if fmt.key_bits == RAW:
      s = raw_scores(rows(k_refs[0], 0, h))
    else:
      # Keys dequantized in registers to f16 (one FMA per code), then one dot per sub-block over all t slots.
      codes_ref, scale_ref, zero_ref = k_refs
      packed = _load_packed(lambda col, w: rows(codes_ref, col, w), fmt.key_bits, h, 0, ksub)
      groups = t // fmt.key_group
      s = None
      for sub in range(nk):
        # One scale row per key group, widened to its slots in registers (f16 throughout: one paired FMA per
        # two codes).
        scale, zero = (jnp.broadcast_to(rows.groups(ref, sub * ksub, ksub)[:, None, :],
                                        (groups, fmt.key_group, ksub)).reshape(t, ksub)
                       for ref in (scale_ref, zero_ref))
        k = _codes(packed, sub, fmt.key_bits) * scale + zero
        part = dot_nt(q16[sub], k)
        s = part if s is None else s + part
      # Outlier channels (their codes decode to 0): O outer products in f32, too narrow for a dot.
      for c in range(fmt.key_outliers):
        qc = q_out_ref[:, pl.ds(c, 1)] * _LOG2E                             # [Gp, 1]
        s = s + qc * rows.column(out_ref, c).astype(jnp.float32)[None, :]
    if fmt.value_bits == RAW:
      mix = raw_mix(lambda col, w: rows(v_refs[0], col, w))
    else:
      # Values stay codes: each chunk's scale is folded into p (p * scale per slot) and its min enters as
      # sum_t p_t * min_t, so the codes meet the dot exactly (integers < 256 are exact in f16).
      codes_ref, scale_ref, zero_ref = v_refs
      gv = fmt.value_group

      paired = fmt.paired_values(h)
      if paired:   # the whole 2-bit plane, and the 1-bit plane read twice over (_paired_codes)
        w8 = h // 8
        low = rows(codes_ref, 0, 2 * w8).astype(jnp.int32)
        high = rows.gather(codes_ref, 2 * w8 + jnp.arange(2 * w8) % w8).astype(jnp.int32)

      def mix(p):
        out, loaded = [], {}
        for off, sub, first_ch in chunks:
          if not paired and off not in loaded:
            loaded[off] = _load_packed(lambda col, w: rows(codes_ref, col, w), fmt.value_bits, h, off, u)
          col = first_ch // gv
          scale = rows.column(scale_ref, col).astype(jnp.float32)      # [t]
          zero = rows.column(zero_ref, col).astype(jnp.float32)
          ps = (p * scale[None, :]).astype(jnp.float16)
          pz = jnp.sum(p * zero[None, :], axis=1, keepdims=True)     # [Gp, 1]
          c = _paired_codes(low, high, sub) if paired else _codes(loaded[off], sub, fmt.value_bits)
          out.append(dot_nn(ps, c) + pz)
        return out
    return _update(state, s, valid, mix)

  def side_loop(state, k_ref, v_ref, lo, hi, first, count):
    """Blocks [first, first + count) of a bf16 segment, stopping at the block holding slot hi - 1."""
    last = jnp.minimum(first + count, (hi + side_block - 1) // side_block)
    step = lambda i, st: side_step(st, k_ref, v_ref, i * side_block, lo, hi)  # noqa: E731
    return jax.lax.fori_loop(first, jnp.maximum(first, last), step, state)

  state = (jnp.full((gp,), _MASKED, jnp.float32), jnp.zeros((gp,), jnp.float32),
           tuple(jnp.zeros((gp, u), jnp.float32) for _ in chunks))

  # Body blocks: split j takes blocks [j * per, (j + 1) * per), stopping at the row's last valid block.
  capacity = table_ref.shape[0] * fmt.page_size if fmt.page_size else k_refs[0].shape[0]
  n_body = -(-capacity // t)
  per = -(-n_body // splits)
  lo = j * per
  hi = jnp.minimum(lo + per, (body_len + t - 1) // t)
  state = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), body_step, state)

  # Recent blocks, shared out the same way; the sinks and the patch go to split 0 (other splits start past
  # the end, so their loops run zero times).
  r_per = -(-(-(-recent_k_ref.shape[0] // side_block)) // splits)
  state = side_loop(state, recent_k_ref, recent_v_ref, patch_len, recent_len, j * r_per, r_per)
  first = jnp.minimum(j, 1) * (1 << 20)   # (jnp.where on two constants lowers to a bool add on Triton)
  state = side_loop(state, sink_k_ref, sink_v_ref, 0, sink_len, first, 1 << 20)
  state = side_loop(state, recent_k_ref, patch_v_ref, 0, patch_len, first, 1 << 20)

  m, l, accs = state
  if splits == 1:   # the whole sequence is here: normalize in place, so there is nothing left to combine
    inv = jnp.where(l > 0, 1.0 / jnp.where(l > 0, l, 1.0), 0.0)[:, None]
    accs = tuple(a * inv for a in accs)
  real = jnp.broadcast_to((jnp.arange(gp) < g)[:, None], (gp, u))   # padding rows are never written
  for (_, _, first_ch), acc in zip(chunks, accs):
    plgpu.store(o_ref.at[:, pl.ds(first_ch, u)], acc, mask=real)
  m_ref[...] = m
  l_ref[...] = l



# ------------------------------------------------------------------------------------------------ wrapper


def _body_arrays(fmt: Format, body_k, body_v) -> list:
  ks = [body_k] if fmt.key_bits == RAW else list(body_k)
  vs = [body_v] if fmt.value_bits == RAW else list(body_v)
  return ks + vs


def _key_names(fmt: Format) -> tuple[str, ...]:
  if fmt.key_bits == RAW:
    return ("body key",)
  return ("body key", "body key scale", "body key zero") + (("body key outliers",) if fmt.key_outliers else ())


def validate(q, sink_k, body_k, body_v, recent_k, patch_v, lengths, page_table, fmt: Format,
             q_out=None) -> None:
  """Static checks (shapes, dtypes, layout) with the offending values in the message."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, K, G, H], got shape {q.shape}")
  b, kh, g, h = q.shape
  if g > _MIN_ROWS * 8:
    raise ValueError(f"G={g} query heads per kv head is more than this kernel handles ({_MIN_ROWS * 8})")
  if h & (h - 1) or h < _MIN_ROWS:
    raise ValueError(f"head dim H={h} must be a power of 2 >= {_MIN_ROWS}")
  for name, bits in (("key_bits", fmt.key_bits), ("value_bits", fmt.value_bits)):
    if bits == RAW:
      continue
    n = quant_reference.sub_block_count(bits)
    if h // n < _MIN_ROWS:
      raise ValueError(f"head dim H={h} is too small for {name}={bits}: each of the {n} packed "
                       f"sub-blocks needs >= {_MIN_ROWS} channels")
  if fmt.value_bits != RAW and h % fmt.value_group:
    raise ValueError(f"head dim H={h} is not a multiple of value_group={fmt.value_group}")
  for name, x in (("sink_k", sink_k), ("recent_k", recent_k), ("patch_v", patch_v)):
    if x.ndim != 4 or x.shape[:2] != (b, kh) or x.shape[3] != h:
      raise ValueError(f"{name} must be [B={b}, K={kh}, *, H={h}], got shape {x.shape}")
  if lengths.shape != (b, kh, 4):
    raise ValueError(f"lengths must be i32[B={b}, K={kh}, 4] (sink, body, patch, recent), got {lengths.shape}")
  if (page_table is None) != (fmt.page_size == 0):
    raise ValueError(f"page_table is {'missing' if page_table is None else 'given'} but page_size="
                     f"{fmt.page_size}")
  heads = 1 if fmt.page_size else kh
  keys = [body_k] if fmt.key_bits == RAW else list(body_k)
  if len(keys) != len(_key_names(fmt)):
    raise ValueError(f"body_k must be ({', '.join(_key_names(fmt))}) for key_bits={fmt.key_bits}, key_outliers="
                     f"{fmt.key_outliers}; got {len(keys)} arrays")
  for name, x in zip(_key_names(fmt), keys):
    if x.ndim != 4 or x.shape[:2] != (b, heads):
      raise ValueError(f"{name} must be [B={b}, {heads}, ...], got shape {x.shape}")
  if fmt.key_outliers:
    o = fmt.key_outliers
    if keys[3].shape[3] != o:
      raise ValueError(f"body key outliers must be [..., O={o}], got shape {keys[3].shape}")
    if q_out is None or q_out.shape != (b, kh, g, o):
      raise ValueError(f"key_outliers={o} needs q_out f32[B={b}, K={kh}, G={g}, O={o}], got "
                       f"{None if q_out is None else q_out.shape}")
  elif q_out is not None:
    raise ValueError("q_out is given but the format has no outlier key channels (key_outliers=0)")
  for name, x in zip(("body value", "body value scale", "body value zero") if fmt.value_bits != RAW else
                     ("body value",), [body_v] if fmt.value_bits == RAW else body_v):
    if x.ndim != 4 or x.shape[:2] != (b, heads):
      raise ValueError(f"{name} must be [B={b}, {heads}, ...], got shape {x.shape}")
  m = (body_k if fmt.key_bits == RAW else body_k[0]).shape[2]
  if fmt.key_bits != RAW and m % fmt.key_group:
    raise ValueError(f"body capacity {m} is not a multiple of key_group={fmt.key_group}")
  if page_table is not None and page_table.shape[:2] != (b, kh):
    raise ValueError(f"page_table must be i32[B={b}, K={kh}, P_max], got shape {page_table.shape}")


def default_splits(fmt: Format, capacity: int, programs: int, *, sms: int = _SMS,
                   ctas_per_sm: int = _CTAS_PER_SM) -> int:
  """Splits per (row, kv head), from occupancy: FlashAttention-2's wave-efficiency rule.

  With P = programs and c = sms * ctas_per_sm resident CTAs, s splits run in P s / c waves, the last one
  partly empty. A grid that already fills 80% of a wave is not split; otherwise the smallest s whose wave
  efficiency (waves / ceil(waves)) is within 85% of the best over s = 1..64 wins, keeping >= 2 blocks per split.
  """
  slots = sms * ctas_per_sm
  blocks = max(1, -(-capacity // fmt.block))
  if programs >= 0.8 * slots:
    return 1
  limit = max(1, min(64, blocks // 2))

  def efficiency(s):
    waves = programs * s / slots
    return waves / math.ceil(waves)

  best = max(efficiency(s) for s in range(1, limit + 1))
  return next(s for s in range(1, limit + 1) if efficiency(s) >= 0.85 * best)


@functools.partial(jax.jit, static_argnames=("fmt", "splits", "side_block", "num_warps", "num_stages",
                                             "interpret"))
def decode_attention(q, sink_k, sink_v, body_k, body_v, recent_k, recent_v, patch_v, lengths, page_table=None,
                     q_out=None, *, fmt: Format, splits: int | None = None, side_block: int = 32, num_warps: int = 4,
                     num_stages: int = 3, interpret: bool = False):
  """Partial attention of one query token per row over a compressed cache; merge with `combine`.

  Args:
    q: f32[B, K, G, H] queries grouped by kv head, already multiplied by the softmax scale.
    sink_k, sink_v: bf16[B, K, Z, H].
    body_k: bf16[B, K', M, H], or (codes u8[B, K', M, H*kb/8], scale f16[B, K', M/gk, H], zero f16[...]) with
      K' = K, or K' = 1 and M = pages * page_size for a page pool; with fmt.key_outliers = O also outliers
      bf16[B, K', M, O] (the outlier channels, whose codes decode to 0).
    body_v: bf16[B, K', M, H], or (codes u8[B, K', M, H*vb/8], scale f16[B, K', M, H/gv], zero f16[...]).
    recent_k, recent_v: bf16[B, K, R, H].
    patch_v: bf16[B, K, F, H] values of recent slots [0, patch_len) (F >= the largest patch_len).
    lengths: i32[B, K, 4] = (sink_len, body_len, patch_len, recent_len) per head.
    page_table: i32[B, K, P_max] pool page of each head's logical page (paged formats only).
    q_out: f32[B, K, G, O] q at each kv head's outlier key channels (scaled like q), when fmt.key_outliers.
    fmt: the body's static layout.
    splits: sequence splits per (row, kv head); default from `default_splits`.

  Returns:
    (o f32[B, K, S', Gp, H] unnormalized, or normalized when S' = 1 (rows >= G are padding, never written),
    m f32[B, K, S', Gp] row max in log2 units, l f32[B, K, S', Gp] row sum), S' splits.
  """
  validate(q, sink_k, body_k, body_v, recent_k, patch_v, lengths, page_table, fmt, q_out)
  b, kh, g, h = q.shape
  gp = max(_MIN_ROWS, 1 << (g - 1).bit_length())
  qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  body = _body_arrays(fmt, body_k, body_v)
  nk = len(_key_names(fmt))
  capacity = body[0].shape[2] if not fmt.page_size else page_table.shape[2] * fmt.page_size
  if splits is None:
    splits = default_splits(fmt, capacity, b * kh)
  if splits < 1:
    raise ValueError(f"splits={splits} must be >= 1")
  if side_block < _MIN_ROWS or side_block & (side_block - 1):
    raise ValueError(f"side_block={side_block} must be a power of 2 >= {_MIN_ROWS}")

  def head_spec(x):           # the (b, k) slice of a per-head array, whole along the other axes
    return pl.BlockSpec((None, None, *x.shape[2:]), lambda i, k, j: (i, k) + (0,) * (x.ndim - 2))

  def body_spec(x):           # per head, or the row's whole pool
    if fmt.page_size:
      return pl.BlockSpec((None, None, *x.shape[2:]), lambda i, k, j: (i, 0) + (0,) * (x.ndim - 2))
    return head_spec(x)

  args = [qp, lengths.astype(jnp.int32), sink_k, sink_v, recent_k, recent_v, patch_v, *body[:nk]]
  specs = [head_spec(x) for x in args[:7]] + [body_spec(x) for x in body[:nk]]
  if fmt.key_outliers:
    args.append(jnp.pad(q_out.astype(jnp.float32), ((0, 0), (0, 0), (0, gp - g), (0, 0))))
    specs.append(head_spec(args[-1]))
  args += body[nk:]
  specs += [body_spec(x) for x in body[nk:]]
  if fmt.page_size:
    args.append(page_table.astype(jnp.int32))
    specs.append(head_spec(page_table))
  out_shape = (jax.ShapeDtypeStruct((b, kh, splits, gp, h), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32),
               jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32))
  out_specs = (pl.BlockSpec((None, None, None, gp, h), lambda i, k, j: (i, k, j, 0, 0)),
               pl.BlockSpec((None, None, None, gp), lambda i, k, j: (i, k, j, 0)),
               pl.BlockSpec((None, None, None, gp), lambda i, k, j: (i, k, j, 0)))
  o, m, l = pl.pallas_call(
      functools.partial(_kernel, fmt, splits, side_block, g),
      out_shape=out_shape, grid=(b, kh, splits), in_specs=specs, out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="akv_decode_attention")(*args)
  return o, m, l


def combine(o: jax.Array, m: jax.Array, l: jax.Array, g: int) -> jax.Array:
  """Merges split partials (from `decode_attention`) into f32[B, K, G, H]; a row with no tokens gives 0.

  With one split the kernel has already normalized its output, so this only drops the padding rows.
  """
  if o.shape[2] == 1:
    return o[:, :, 0, :g]
  o, m, l = o[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]      # the real query heads only
  mx = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp2(m - mx)                                             # [B, K, S', G] (m in log2 units)
  total = jnp.sum(w * l, axis=2)                                   # [B, K, G]
  return jnp.sum(w[..., None] * o, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]


# ------------------------------------------------------------------------------------------------ reference


def _dequant(body, bits: int, group: int, axis: int) -> jax.Array:
  """Body keys (scales per `group` tokens, axis 2) or values (per `group` channels, axis 3) as f32, by the one
  dequantize formula (outlier key channels, when present, decode to 0 and are added separately)."""
  if bits == RAW:
    return body.astype(jnp.float32)
  codes, scale, zero = body[:3]
  return quant_reference.dequantize(codes, scale, zero, bits=bits, group=group,
                                    axis="channel" if axis == 2 else "token")


def _heads(x: jax.Array, page_table, fmt: Format) -> jax.Array:
  """Pool [B, 1, P * Q, H] -> per-head logical [B, K, P_max * Q, H] through the page table."""
  if not fmt.page_size:
    return x
  b = x.shape[0]
  pages = x[:, 0].reshape(b, -1, fmt.page_size, x.shape[-1])
  got = jax.vmap(lambda p, t: p[jnp.maximum(t, 0)])(pages, page_table)       # [B, K, P_max, Q, H]
  return got.reshape(b, page_table.shape[1], -1, x.shape[-1])


def decode_attention_reference(q, sink_k, sink_v, body_k, body_v, recent_k, recent_v, patch_v, lengths,
                               page_table=None, q_out=None, *, fmt: Format) -> jax.Array:
  """Plain-jnp attention with the same contract as decode_attention + combine: f32[B, K, G, H]."""
  keys_b = _heads(_dequant(body_k, fmt.key_bits, fmt.key_group, 2), page_table, fmt)
  vals_b = _heads(_dequant(body_v, fmt.value_bits, fmt.value_group, 3), page_table, fmt)
  sink_len, body_len, patch_len, recent_len = (lengths[..., i][..., None] for i in range(4))

  def slots(x):
    return jnp.arange(x.shape[2])[None, None, :]

  f = patch_v.shape[2]
  patch_k = recent_k[:, :, :f]
  keys = jnp.concatenate([sink_k.astype(jnp.float32), keys_b, patch_k.astype(jnp.float32),
                          recent_k.astype(jnp.float32)], axis=2)
  values = jnp.concatenate([sink_v.astype(jnp.float32), vals_b, patch_v.astype(jnp.float32),
                            recent_v.astype(jnp.float32)], axis=2)
  valid = jnp.concatenate([slots(sink_k) < sink_len, slots(keys_b) < body_len,
                           jnp.broadcast_to(slots(patch_k) < patch_len, patch_k.shape[:3]),
                           (slots(recent_k) >= patch_len) & (slots(recent_k) < recent_len)], axis=2)
  s = jnp.einsum("BKGH,BKSH->BKGS", q.astype(jnp.float32), keys, precision=jax.lax.Precision.HIGHEST)
  if fmt.key_outliers:
    held = _heads(body_k[3].astype(jnp.float32), page_table, fmt)                # [B, K, M, O]
    extra = jnp.einsum("BKGO,BKSO->BKGS", q_out.astype(jnp.float32), held, precision=jax.lax.Precision.HIGHEST)
    z, m = sink_k.shape[2], keys_b.shape[2]
    s = s + jnp.pad(extra, ((0, 0), (0, 0), (0, 0), (z, s.shape[-1] - z - m)))
  s = jnp.where(valid[:, :, None], s, _MASKED)
  p = jnp.where(valid[:, :, None], jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
  total = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("BKGS,BKSH->BKGH", p, values, precision=jax.lax.Precision.HIGHEST)
  return o / jnp.where(total > 0, total, 1.0)
