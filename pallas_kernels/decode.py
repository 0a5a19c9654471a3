"""Fused decode attention over a compressed KV cache (Pallas, Triton backend), with its plain-jnp reference.

One query token per row; all G query heads of a kv head share a program (padded to 16 rows, the smallest dot).
Each program reads one slice of the cache directly in its stored form and keeps an online softmax in f32:

  sinks    bf16 [Z, H]                          slots [0, sink_len)
  body     packed keys (per-channel groups of key_group tokens: the scale is folded into the query and the min
           enters as one q.zero term per group) and packed values (per-token groups of value_group channels,
           dequantized in registers), or bf16 rows; per head [M, ...] or a page pool read through a page table;
           slots [0, body_len)
  patch    recent keys [0, patch_len) whose values already left the bf16 window (KIVI's residual rule: a value is
           quantized one token at a time, its key a whole group later); their values come in `patch_v`
  recent   bf16 [R, H]                          slots [patch_len, recent_len)

Packed codes: n = 8 / bits codes per byte; byte j of a row holds head-dim elements j, j + H/n, ..., so sub-block
i of the unpacked row is the contiguous head-dim range [i H/n, (i + 1) H/n): q.k is a sum of n dots over ref
slices of q and p@v writes n output slices, with no value slicing or concatenation (which Triton rejects).

Long caches split along the sequence (flash-decoding): program j of (b, k) takes the j-th share of body and
recent blocks (split 0 also the sinks and the patch) and writes an unnormalized partial output with its row max
and sum; `combine` merges the splits in XLA. Blocks past a row's length are never visited, and the last block is
read with masked loads, since the Triton backend does not mask partial blocks.

This module takes plain arrays and never imports akv_jax; akv_jax.attention maps a CompressedKV onto it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.dots import dot_nn, dot_nt

_MASKED = -1e30          # finite, so a fully masked block cannot produce inf - inf = NaN
_MIN_ROWS = 16           # smallest dot dimension on the Triton backend: the G query heads are padded to it
QUANT_BITS = (2, 4, 8)
RAW = 16                 # "bits" of a bf16 (unquantized) body


@dataclasses.dataclass(frozen=True, kw_only=True)
class Format:
  """Static layout of the body a kernel reads (hashable: a static argument).

  Attributes:
    key_bits: 2, 4 or 8 for packed keys quantized per channel, or 16 for bf16 rows.
    key_group: tokens per key scale row (KIVI keys: one scale per channel per group); also the body block.
    value_bits: 2, 4 or 8 for packed values quantized per token, or 16 for bf16 rows.
    value_group: channels per value scale column.
    page_size: tokens per page when the body is a page pool read through a page table, else 0.
    block: body tokens per loop step when the keys are bf16 (quantized keys use key_group, paged bodies
      page_size).
  """

  key_bits: int = RAW
  key_group: int = 32
  value_bits: int = RAW
  value_group: int = 32
  page_size: int = 0
  block: int = 32

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

  @property
  def body_block(self) -> int:
    if self.page_size:
      return self.page_size
    return self.key_group if self.key_bits != RAW else self.block


# ------------------------------------------------------------------------------------------------ kernel


def _codes(ref, row, rows: int, valid, bits: int):
  """Packed codes u8[rows, H*bits/8] at `row` -> the n unpacked sub-blocks, each f32[rows, H/n]."""
  width = ref.shape[-1]
  packed = plgpu.load(ref.at[pl.ds(row, rows), :], mask=jnp.broadcast_to(valid[:, None], (rows, width)),
                      other=0).astype(jnp.int32)
  mask = (1 << bits) - 1
  return [((packed >> (i * bits)) & mask).astype(jnp.float32) for i in range(8 // bits)]


def _value_block(fmt: Format, v_refs, row, rows: int, valid, h: int):
  """Body values of `rows` slots at storage row `row`: the n_v dequantized sub-blocks f32[rows, H/n_v]."""
  if fmt.value_bits == RAW:
    (v_ref,) = v_refs
    return [plgpu.load(v_ref.at[pl.ds(row, rows), :], mask=jnp.broadcast_to(valid[:, None], (rows, h)),
                       other=0).astype(jnp.float32)]
  codes_ref, scale_ref, zero_ref = v_refs
  n = 8 // fmt.value_bits
  sub = h // n
  gv = fmt.value_group
  cols = max(1, sub // gv)
  out = []
  for i, c in enumerate(_codes(codes_ref, row, rows, valid, fmt.value_bits)):
    first = (i * sub) // gv
    m = jnp.broadcast_to(valid[:, None], (rows, cols))
    s = plgpu.load(scale_ref.at[pl.ds(row, rows), pl.ds(first, cols)], mask=m, other=0).astype(jnp.float32)
    z = plgpu.load(zero_ref.at[pl.ds(row, rows), pl.ds(first, cols)], mask=m, other=0).astype(jnp.float32)
    if cols > 1:  # each scale column covers gv consecutive channels of this sub-block
      s = jnp.broadcast_to(s[:, :, None], (rows, cols, gv)).reshape(rows, sub)
      z = jnp.broadcast_to(z[:, :, None], (rows, cols, gv)).reshape(rows, sub)
    out.append(c * s + z)
  return out


def _update(state, s, valid, values):
  """One online-softmax step: scores s f32[Gp, rows] (valid bool[rows]), values = n sub-blocks [rows, H/n]."""
  m, l, accs = state
  s = jnp.where(valid[None, :], s, _MASKED)
  m_new = jnp.maximum(m, jnp.max(s, axis=1))
  alpha = jnp.exp(m - m_new)
  p = jnp.where(valid[None, :], jnp.exp(s - m_new[:, None]), 0.0)
  l = l * alpha + jnp.sum(p, axis=1)
  accs = tuple(a * alpha[:, None] + dot_nn(p, v) for a, v in zip(accs, values))
  return m_new, l, accs


def _kernel(fmt: Format, splits: int, side_block: int, *refs):
  # Refs, per program (b, k, j):
  #   q_ref [Gp, H] f32 (scaled); lens_ref i32[4] = (sink_len, body_len, patch_len, recent_len)
  #   sink_k_ref, sink_v_ref [Z, H]; recent_k_ref, recent_v_ref [R, H]; patch_v_ref [F, H]
  #   body key refs: codes u8[M, H*kb/8], scale f16[M/gk, H], zero f16[M/gk, H]  (or one bf16 [M, H])
  #   body value refs: codes u8[M, H*vb/8], scale f16[M, H/gv], zero f16[M, H/gv] (or one bf16 [M, H])
  #   table_ref i32[P_max] when paged; then o_ref [Gp, H] f32, m_ref, l_ref f32[Gp].
  it = iter(refs)
  q_ref, lens_ref, sink_k_ref, sink_v_ref, recent_k_ref, recent_v_ref, patch_v_ref = (next(it) for _ in range(7))
  k_refs = (next(it),) if fmt.key_bits == RAW else (next(it), next(it), next(it))
  v_refs = (next(it),) if fmt.value_bits == RAW else (next(it), next(it), next(it))
  table_ref = next(it) if fmt.page_size else None
  o_ref, m_ref, l_ref = next(it), next(it), next(it)

  j = pl.program_id(2)
  gp, h = q_ref.shape
  nv = 1 if fmt.value_bits == RAW else 8 // fmt.value_bits
  vsub = h // nv
  sink_len, body_len, patch_len, recent_len = lens_ref[0], lens_ref[1], lens_ref[2], lens_ref[3]
  q = q_ref[...]

  def bf16_segment(state, k_ref, v_ref, start, lo, hi):
    """Slots [start, start + side_block) of a bf16 segment, keeping those in [lo, hi)."""
    slot = start + jnp.arange(side_block)
    valid = (slot >= lo) & (slot < hi)
    m2 = jnp.broadcast_to(valid[:, None], (side_block, h))
    k = plgpu.load(k_ref.at[pl.ds(start, side_block), :], mask=m2, other=0).astype(jnp.float32)
    s = dot_nt(q, k)
    values = [plgpu.load(v_ref.at[pl.ds(start, side_block), pl.ds(i * vsub, vsub)],
                         mask=jnp.broadcast_to(valid[:, None], (side_block, vsub)), other=0).astype(jnp.float32)
              for i in range(nv)]
    return _update(state, s, valid, values)

  # Loop-invariant query pieces for packed keys: sub-block i of q pairs with sub-block i of the codes.
  if fmt.key_bits != RAW:
    nk = 8 // fmt.key_bits
    ksub = h // nk
    q_subs = [q_ref[:, pl.ds(i * ksub, ksub)] for i in range(nk)]

  bb = fmt.body_block

  def body_step(i, state):
    slot = i * bb + jnp.arange(bb)
    valid = slot < body_len
    if fmt.page_size:
      row = jnp.maximum(table_ref[i], 0) * fmt.page_size
    else:
      row = i * bb
    if fmt.key_bits == RAW:
      (k_ref,) = k_refs
      k = plgpu.load(k_ref.at[pl.ds(row, bb), :], mask=jnp.broadcast_to(valid[:, None], (bb, h)),
                     other=0).astype(jnp.float32)
      s = dot_nt(q, k)
    else:
      codes_ref, scale_ref, zero_ref = k_refs
      group = row // fmt.key_group   # the block is exactly one key group
      zero = zero_ref[pl.ds(group, 1), :].astype(jnp.float32)                       # [1, H]
      s = jnp.sum(q * zero, axis=1, keepdims=True)                                   # sum_c q_c * min_c
      for sub, (qi, c) in enumerate(zip(q_subs, _codes(codes_ref, row, bb, valid, fmt.key_bits))):
        scale = scale_ref[pl.ds(group, 1), pl.ds(sub * ksub, ksub)].astype(jnp.float32)  # [1, H/n]
        s = s + dot_nt(qi * scale, c)
    return _update(state, s, valid, _value_block(fmt, v_refs, row, bb, valid, h))

  def side_loop(state, k_ref, v_ref, lo, hi, first, count):
    """Blocks [first, first + count) of a bf16 segment, stopping at the block holding slot hi - 1."""
    last = jnp.minimum(first + count, (hi + side_block - 1) // side_block)
    step = lambda i, st: bf16_segment(st, k_ref, v_ref, i * side_block, lo, hi)  # noqa: E731
    return jax.lax.fori_loop(first, jnp.maximum(first, last), step, state)

  state = (jnp.full((gp,), _MASKED, jnp.float32), jnp.zeros((gp,), jnp.float32),
           tuple(jnp.zeros((gp, vsub), jnp.float32) for _ in range(nv)))

  # Body blocks: split j takes blocks [j * per, (j + 1) * per), stopping at the row's last valid block.
  n_body = table_ref.shape[0] if fmt.page_size else -(-k_refs[0].shape[0] // bb)
  per = -(-n_body // splits)
  lo = j * per
  hi = jnp.minimum(lo + per, (body_len + bb - 1) // bb)
  state = jax.lax.fori_loop(lo, jnp.maximum(lo, hi), body_step, state)

  # Recent blocks, shared out the same way; the sinks and the patch go to split 0 (other splits start past
  # the end, so their loops run zero times).
  r_per = -(-(-(-recent_k_ref.shape[0] // side_block)) // splits)
  state = side_loop(state, recent_k_ref, recent_v_ref, patch_len, recent_len, j * r_per, r_per)
  first = jnp.minimum(j, 1) * (1 << 20)   # (jnp.where on two constants lowers to a bool add on Triton)
  state = side_loop(state, sink_k_ref, sink_v_ref, 0, sink_len, first, 1 << 20)
  state = side_loop(state, recent_k_ref, patch_v_ref, 0, patch_len, first, 1 << 20)

  m, l, accs = state
  for i, acc in enumerate(accs):
    o_ref[:, pl.ds(i * vsub, vsub)] = acc
  m_ref[...] = m
  l_ref[...] = l


# ------------------------------------------------------------------------------------------------ wrapper


def _body_arrays(fmt: Format, body_k, body_v) -> list:
  ks = [body_k] if fmt.key_bits == RAW else list(body_k)
  vs = [body_v] if fmt.value_bits == RAW else list(body_v)
  return ks + vs


def validate(q, sink_k, body_k, body_v, recent_k, patch_v, lengths, page_table, fmt: Format) -> None:
  """Static checks (shapes, dtypes, layout) with the offending values in the message."""
  if q.ndim != 4:
    raise ValueError(f"q must be [B, K, G, H], got shape {q.shape}")
  b, kh, g, h = q.shape
  if g > _MIN_ROWS * 8:
    raise ValueError(f"G={g} query heads per kv head is more than this kernel handles ({_MIN_ROWS * 8})")
  if h & (h - 1) or h < _MIN_ROWS:
    raise ValueError(f"head dim H={h} must be a power of 2 >= {_MIN_ROWS}")
  for name, bits in (("key_bits", fmt.key_bits), ("value_bits", fmt.value_bits)):
    if bits != RAW and h // (8 // bits) < _MIN_ROWS:
      raise ValueError(f"head dim H={h} is too small for {name}={bits}: each of the {8 // bits} packed "
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
  for name, x in zip(("body key", "body key scale", "body key zero") if fmt.key_bits != RAW else ("body key",),
                     [body_k] if fmt.key_bits == RAW else body_k):
    if x.ndim != 4 or x.shape[:2] != (b, heads):
      raise ValueError(f"{name} must be [B={b}, {heads}, ...], got shape {x.shape}")
  for name, x in zip(("body value", "body value scale", "body value zero") if fmt.value_bits != RAW else
                     ("body value",), [body_v] if fmt.value_bits == RAW else body_v):
    if x.ndim != 4 or x.shape[:2] != (b, heads):
      raise ValueError(f"{name} must be [B={b}, {heads}, ...], got shape {x.shape}")
  m = (body_k if fmt.key_bits == RAW else body_k[0]).shape[2]
  if fmt.key_bits != RAW and m % fmt.key_group:
    raise ValueError(f"body capacity {m} is not a multiple of key_group={fmt.key_group}")
  if page_table is not None and page_table.shape[:2] != (b, kh):
    raise ValueError(f"page_table must be i32[B={b}, K={kh}, P_max], got shape {page_table.shape}")


def default_splits(fmt: Format, capacity: int, programs: int) -> int:
  """Splits per (row, kv head): enough programs to fill a GPU (~2 per SM of an H100), >= 8 blocks each."""
  blocks = max(1, -(-capacity // fmt.body_block))
  want = max(1, -(-264 // max(programs, 1)))
  return int(max(1, min(want, blocks // 8 if blocks >= 16 else 1, 64)))


@functools.partial(jax.jit, static_argnames=("fmt", "splits", "side_block", "num_warps", "num_stages",
                                             "interpret"))
def decode_attention(q, sink_k, sink_v, body_k, body_v, recent_k, recent_v, patch_v, lengths, page_table=None, *,
                     fmt: Format, splits: int | None = None, side_block: int = 32, num_warps: int = 4,
                     num_stages: int = 2, interpret: bool = False):
  """Partial attention of one query token per row over a compressed cache; merge with `combine`.

  Args:
    q: f32[B, K, G, H] queries grouped by kv head, already multiplied by the softmax scale.
    sink_k, sink_v: bf16[B, K, Z, H].
    body_k: bf16[B, K', M, H], or (codes u8[B, K', M, H*kb/8], scale f16[B, K', M/gk, H], zero f16[...]) with
      K' = K, or K' = 1 and M = pages * page_size for a page pool.
    body_v: bf16[B, K', M, H], or (codes u8[B, K', M, H*vb/8], scale f16[B, K', M, H/gv], zero f16[...]).
    recent_k, recent_v: bf16[B, K, R, H].
    patch_v: bf16[B, K, F, H] values of recent slots [0, patch_len) (F >= the largest patch_len).
    lengths: i32[B, K, 4] = (sink_len, body_len, patch_len, recent_len) per head.
    page_table: i32[B, K, P_max] pool page of each head's logical page (paged formats only).
    fmt: the body's static layout.
    splits: sequence splits per (row, kv head); default from `default_splits`.

  Returns:
    (o f32[B, K, S', Gp, H] unnormalized, m f32[B, K, S', Gp] row max, l f32[B, K, S', Gp] row sum), S' splits.
  """
  validate(q, sink_k, body_k, body_v, recent_k, patch_v, lengths, page_table, fmt)
  b, kh, g, h = q.shape
  gp = max(_MIN_ROWS, 1 << (g - 1).bit_length())
  qp = jnp.pad(q.astype(jnp.float32), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
  body = _body_arrays(fmt, body_k, body_v)
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

  args = [qp, lengths.astype(jnp.int32), sink_k, sink_v, recent_k, recent_v, patch_v, *body]
  specs = [head_spec(x) for x in args[:7]] + [body_spec(x) for x in body]
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
      functools.partial(_kernel, fmt, splits, side_block),
      out_shape=out_shape, grid=(b, kh, splits), in_specs=specs, out_specs=out_specs,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name="akv_decode_attention")(*args)
  return o, m, l


def combine(o: jax.Array, m: jax.Array, l: jax.Array, g: int) -> jax.Array:
  """Merges split partials (from `decode_attention`) into f32[B, K, G, H]; a row with no tokens gives 0."""
  mx = jnp.max(m, axis=2, keepdims=True)
  w = jnp.exp(m - mx)                                              # [B, K, S', Gp]
  total = jnp.sum(w * l, axis=2)                                   # [B, K, Gp]
  out = jnp.sum(w[..., None] * o, axis=2) / jnp.where(total > 0, total, 1.0)[..., None]
  return out[:, :, :g]


# ------------------------------------------------------------------------------------------------ reference


def _unpack(codes: jax.Array, bits: int) -> jax.Array:
  n = 8 // bits
  shifts = (jnp.arange(n, dtype=jnp.int32) * bits)[:, None]
  blocks = (codes.astype(jnp.int32)[..., None, :] >> shifts) & ((1 << bits) - 1)
  return blocks.reshape(*codes.shape[:-1], n * codes.shape[-1]).astype(jnp.float32)


def _dequant(body, bits: int, group: int, axis: int) -> jax.Array:
  """Body keys (scales per `group` tokens, axis 2) or values (per `group` channels, axis 3) as f32."""
  if bits == RAW:
    return body.astype(jnp.float32)
  codes, scale, zero = body
  rep = lambda x: jnp.repeat(x.astype(jnp.float32), group, axis=axis)  # noqa: E731
  return _unpack(codes, bits) * rep(scale) + rep(zero)


def _heads(x: jax.Array, page_table, fmt: Format) -> jax.Array:
  """Pool [B, 1, P * Q, H] -> per-head logical [B, K, P_max * Q, H] through the page table."""
  if not fmt.page_size:
    return x
  b = x.shape[0]
  pages = x[:, 0].reshape(b, -1, fmt.page_size, x.shape[-1])
  got = jax.vmap(lambda p, t: p[jnp.maximum(t, 0)])(pages, page_table)       # [B, K, P_max, Q, H]
  return got.reshape(b, page_table.shape[1], -1, x.shape[-1])


def decode_attention_reference(q, sink_k, sink_v, body_k, body_v, recent_k, recent_v, patch_v, lengths,
                               page_table=None, *, fmt: Format) -> jax.Array:
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
  s = jnp.where(valid[:, :, None], s, _MASKED)
  p = jnp.where(valid[:, :, None], jnp.exp(s - jnp.max(s, axis=-1, keepdims=True)), 0.0)
  total = jnp.sum(p, axis=-1, keepdims=True)
  o = jnp.einsum("BKGS,BKSH->BKGH", p, values, precision=jax.lax.Precision.HIGHEST)
  return o / jnp.where(total > 0, total, 1.0)
