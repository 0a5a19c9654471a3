"""Fused asymmetric min/max quantize-and-pack of a KV tensor (Pallas, Triton backend).

Axis legend: B batch, K kv heads, S tokens, H head dim.

One program per (b, k, block of tokens) reads x once and writes the packed codes plus the float16 scale and zero
of every group it owns, so quantizing a cache costs one pass over it. The result is bit-identical to the plain-jnp
`quantize_pack_reference` below, which is the one quantizer reference (pallas_kernels.quant_reference, also what
`akv_jax.quant.quantize` computes):

  zero  = group min (valid tokens only) rounded DOWN to float16,
  scale = (group max - zero) / (2^bits - 1) rounded UP to float16,
  code  = clip(floor((x - zero) * inv + 0.5), 0, 2^bits - 1) with inv = 1 / scale (0 when scale == 0),
  invalid tokens get code 0; a group without valid tokens gets scale 0 and zero 0.

axis="channel" groups `group` consecutive tokens of one channel (keys): scale/zero [B, K, S / group, H].
axis="token" groups `group` consecutive channels of one token (values): scale/zero [B, K, S, H / group].
Packing: n = 8 / bits codes per byte; byte j of a row holds head dims j, j + H/n, ..., j + (n-1) H/n, head dim
i * H/n + j in bits [i * bits, (i + 1) * bits). 3-bit codes: the low two bits packed so (H/4 bytes), then the high
bit (H/8 bytes), written by two stores.

Why the kernel does not simply copy the reference's arithmetic: Triton lowers an f32 division to the approximate
`div.full.f32` and has no float16 nextafter, so the kernel never divides in floating point and steps float16
values on their bit pattern. Two divisions remain in the reference, and each is reproduced exactly:
  - `(max - zero) / levels`: XLA's algebraic simplifier rewrites a division by a constant into a multiplication
    by its f32 reciprocal, so what the reference computes is (max - zero) * fl32(1 / levels), and so does the
    kernel;
  - `1 / scale` (a runtime value): scale is a float16 with 11 significant bits, so fl32(1 / scale) comes from
    an integer long division of its mantissa (`quant_reference.recip_f16`). The reference calls the same function
    rather than divide, since XLA:GPU's f32 division is the approximate one too (on a GPU the kernel failed
    against references that divided).
The tests prove each helper equal to its formula over every float16 (and the f32 values around each): XLA's
for the roundings and the scale, IEEE division (numpy's, on the host) for the reciprocal.

Limits of the bit-for-bit claim: NaN inputs (Triton's min/max ignore NaN, XLA's propagate it), and f32 subnormals
(inputs or group ranges below about 2^-120), which some platforms flush to zero. The expression
`(x - zero) * inv + 0.5` is written as the reference writes it. XLA:CPU contracts it into one fma, in the
reference and in the interpreted kernel alike (the rounding-tie tests tell the two roundings apart); on a GPU the
kernel matches where Triton and XLA:GPU make the same choice, which a GPU run of the tests checks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import quant_reference as _ref
from pallas_kernels.quant_reference import AXES, SUPPORTED_BITS, f16_bits, recip_f16

# Rows of x per program when the caller does not say: 64 x H elements keeps a tile within the registers of 4
# warps for H <= 128.
DEFAULT_BLOCK_TOKENS = 64
_F16_SIGN = 0x8000
_F16_MAG = 0x7FFF


def _is_pow2(v: int) -> bool:
  return v >= 1 and (v & (v - 1)) == 0


def _check_common(x_shape, x_dtype, lengths_shape, bits, group, axis):
  """Static checks shared by the kernel and the reference; raises ValueError naming the offending value."""
  if len(x_shape) != 4:
    raise ValueError(f"x must be 4-D [B, K, S, H], got shape {tuple(x_shape)}")
  if not jnp.issubdtype(x_dtype, jnp.floating):
    raise ValueError(f"x must be a float array, got dtype {jnp.dtype(x_dtype).name}")
  b, k, s, h = x_shape
  if tuple(lengths_shape) != (b, k):
    raise ValueError(f"lengths must have shape (B, K) = {(b, k)}, got {tuple(lengths_shape)}")
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
  if axis not in AXES:
    raise ValueError(f"axis={axis!r} must be 'channel' or 'token'")
  if group < 1:
    raise ValueError(f"group={group} must be >= 1")
  if axis == "channel" and s % group:
    raise ValueError(f"S={s} is not a multiple of group={group} (axis='channel' groups tokens)")
  if axis == "token" and h % group:
    raise ValueError(f"H={h} is not a multiple of group={group} (axis='token' groups channels)")
  n = _ref.sub_block_count(bits)   # 3 bits: a 1-bit plane of H/8 bytes
  if h % n:
    raise ValueError(f"H={h} must be a multiple of {n} to pack {bits}-bit codes")


def _check_kernel(x_shape, bits, group, axis, block_tokens, num_warps):
  """Triton-only limits: every array the kernel computes must have a power-of-2 size."""
  if num_warps not in (1, 2, 4, 8, 16):
    raise ValueError(f"num_warps={num_warps} must be one of 1, 2, 4, 8, 16")
  h = x_shape[-1]
  if not _is_pow2(h):
    raise ValueError(f"H={h} must be a power of 2 for the Triton kernel")
  if not _is_pow2(group):
    raise ValueError(f"group={group} must be a power of 2 for the Triton kernel")
  if not _is_pow2(block_tokens):
    raise ValueError(f"block_tokens={block_tokens} must be a power of 2")
  if axis == "channel" and block_tokens % group:
    raise ValueError(f"block_tokens={block_tokens} must be a multiple of group={group} for axis='channel'")


def check_quantize_pack_args(x_shape, x_dtype, lengths_shape, *, bits: int, group: int, axis: str,
                             block_tokens: int | None = None, num_warps: int = 4) -> int:
  """Validates the static settings of `quantize_pack`; returns the block size it will use.

  Raises:
    ValueError: naming the offending value.
  """
  _check_common(x_shape, x_dtype, lengths_shape, bits, group, axis)
  if block_tokens is None:
    block_tokens = max(DEFAULT_BLOCK_TOKENS, group) if axis == "channel" else DEFAULT_BLOCK_TOKENS
  _check_kernel(x_shape, bits, group, axis, block_tokens, num_warps)
  return block_tokens


# ---------------------------------------------------------------------------------------------------------------
# Exact float16 rounding without division or nextafter (both lower badly to Triton, see the module docstring).
# These run on plain arrays of any shape, inside the kernel or outside it.


def _f16_from_bits(u: jax.Array) -> jax.Array:
  return lax.bitcast_convert_type(u.astype(jnp.int16), jnp.float16)


def _next_f16(v16: jax.Array, up: bool) -> jax.Array:
  """jnp.nextafter(v16, +-inf) on the bit pattern, for non-NaN v16.

  Moving up means a larger magnitude for positives and a smaller one for negatives; both zeros step to the
  smallest subnormal of the target sign and the infinity of the target sign stays put, as IEEE nextafter does.
  """
  u = f16_bits(v16)
  neg = u >= _F16_SIGN
  step = jnp.where(neg, u - 1, u + 1) if up else jnp.where(neg, u + 1, u - 1)
  from_zero = 0x0001 if up else _F16_SIGN | 0x0001
  target_inf = 0x7C00 if up else 0xFC00
  step = jnp.where(u == target_inf, u, step)
  return _f16_from_bits(jnp.where((u & _F16_MAG) == 0, from_zero, step))


def _round_f16(v: jax.Array, up: bool) -> jax.Array:
  """f32 -> the nearest float16 >= v (up) or <= v (down): round to nearest, then step where that went past v."""
  c = v.astype(jnp.float16)
  c32 = c.astype(jnp.float32)
  return jnp.where((c32 < v) if up else (c32 > v), _next_f16(c, up=up), c)


def _scale_f16(t: jax.Array, levels: int) -> jax.Array:
  """f32 range t -> float16 scale: the reference's round_up_f16(t / levels) as XLA compiles it.

  XLA's algebraic simplifier turns a division by a constant into a multiplication by fl32(1 / levels); Triton
  would turn the division into the approximate div.full.f32, so the multiplication is written out.
  """
  return _round_f16(t * (np.float32(1) / np.float32(levels)), up=True)


def _pack_rows(codes: jax.Array, bits: int) -> jax.Array:
  """i32[R, H] codes -> i32[R, H * bits / 8] in the sub-block layout (sub-blocks hold disjoint bits: sum == or)."""
  n = 8 // bits
  r, h = codes.shape
  sub = codes.reshape(r, n, h // n)
  shifts = lax.broadcasted_iota(jnp.int32, (1, n, 1), 1) * bits
  return jnp.sum(sub << shifts, axis=1)


# ---------------------------------------------------------------------------------------------------------------
# Kernel


def _kernel(len_ref, x_ref, codes_ref, scale_ref, zero_ref, *, bits, group, axis, seq_len, block_tokens):
  # len_ref: i32[] valid tokens of this (b, k).
  # x_ref: [T, H] rows s0 .. s0 + T of x (T = block_tokens), the last block overhanging S.
  # codes_ref: u8[T, H * bits / 8].
  # scale_ref, zero_ref: f16[T / group, H] (channel) or f16[T, H / group] (token).
  t, h = x_ref.shape
  levels = (1 << bits) - 1
  s0 = pl.program_id(2) * block_tokens
  rows = s0 + lax.broadcasted_iota(jnp.int32, (t, 1), 0)
  in_range = rows < seq_len
  valid = in_range & (rows < len_ref[...])
  # Real Triton does not mask a block that overhangs S, so the last block must mask its own loads and stores.
  x = plgpu.load(x_ref, mask=jnp.broadcast_to(in_range, (t, h)), other=0.0).astype(jnp.float32)
  valid_x = jnp.broadcast_to(valid, (t, h))

  if axis == "channel":
    gpb = t // group
    g3 = x.reshape(gpb, group, h)
    v3 = valid_x.reshape(gpb, group, h)
    red = 1
    # A group is empty when none of its rows is valid; integer max stands in for jnp.any.
    empty = jnp.max(v3.astype(jnp.int32), axis=red) == 0
  else:
    g3 = x.reshape(t, h // group, group)
    v3 = valid_x.reshape(t, h // group, group)
    red = 2
    empty = jnp.broadcast_to(~valid, (t, h // group))
  mn = jnp.min(jnp.where(v3, g3, jnp.inf), axis=red)
  mx = jnp.max(jnp.where(v3, g3, -jnp.inf), axis=red)
  mn = jnp.where(empty, 0.0, mn)
  mx = jnp.where(empty, 0.0, mx)
  zero16 = _round_f16(mn, up=False)
  zero32 = zero16.astype(jnp.float32)
  scale16 = _scale_f16(mx - zero32, levels)
  inv = recip_f16(scale16)

  zero_b = jnp.expand_dims(zero32, red)
  inv_b = jnp.expand_dims(inv, red)
  codes = jnp.clip(jnp.floor((g3 - zero_b) * inv_b + 0.5), 0, levels)
  codes = jnp.where(v3, codes, 0.0).astype(jnp.int32).reshape(t, h)
  if bits == 3:   # a 2-bit plane (H/4 bytes), then a 1-bit plane (H/8): two stores, no concatenation
    for col, plane in ((0, _pack_rows(codes & 3, 2)), (h // 4, _pack_rows(codes >> 2, 1))):
      plgpu.store(codes_ref.at[:, pl.ds(col, plane.shape[1])], plane.astype(jnp.uint8),
                  mask=jnp.broadcast_to(in_range, plane.shape))
  else:
    packed = _pack_rows(codes, bits)
    plgpu.store(codes_ref, packed.astype(jnp.uint8), mask=jnp.broadcast_to(in_range, packed.shape))

  if axis == "channel":
    grow = pl.program_id(2) * gpb + lax.broadcasted_iota(jnp.int32, (gpb, 1), 0)
    stat_mask = jnp.broadcast_to(grow < seq_len // group, scale16.shape)
  else:
    stat_mask = jnp.broadcast_to(in_range, scale16.shape)
  plgpu.store(scale_ref, scale16, mask=stat_mask)
  plgpu.store(zero_ref, zero16, mask=stat_mask)


def _out_shapes(x_shape, bits, group, axis):
  b, k, s, h = x_shape
  stat = (b, k, s // group, h) if axis == "channel" else (b, k, s, h // group)
  return (jax.ShapeDtypeStruct((b, k, s, h * bits // 8), jnp.uint8),
          jax.ShapeDtypeStruct(stat, jnp.float16),
          jax.ShapeDtypeStruct(stat, jnp.float16))


def _pallas_quantize(x, lengths, init, *, bits, group, axis, block_tokens, num_warps, interpret):
  """The pallas_call; `init` (codes, scale, zero) or None are outputs to write into (tests poison them)."""
  b, k, s, h = x.shape
  t = block_tokens
  gpb = t // group
  stat_block = (None, None, gpb, h) if axis == "channel" else (None, None, t, h // group)
  row_map = lambda bi, ki, si: (bi, ki, si, 0)
  in_specs = [pl.BlockSpec((None, None), lambda bi, ki, si: (bi, ki)),
              pl.BlockSpec((None, None, t, h), row_map)]
  out_specs = (pl.BlockSpec((None, None, t, h * bits // 8), row_map),
               pl.BlockSpec(stat_block, row_map),
               pl.BlockSpec(stat_block, row_map))
  args = [lengths.astype(jnp.int32), x]
  aliases = {}
  if init is not None:
    in_specs += list(out_specs)
    args += list(init)
    aliases = {2: 0, 3: 1, 4: 2}
  kernel = functools.partial(_kernel, bits=bits, group=group, axis=axis, seq_len=s, block_tokens=t)
  if init is not None:
    base = kernel
    kernel = lambda len_ref, x_ref, _c, _s, _z, *outs: base(len_ref, x_ref, *outs)
  return pl.pallas_call(
      kernel,
      out_shape=_out_shapes(x.shape, bits, group, axis),
      grid=(b, k, pl.cdiv(s, t)),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases=aliases,
      # No loop inside a program, so there is nothing for software pipelining to overlap.
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
      interpret=interpret,
      name=f"quantize_pack_{axis}_{bits}b",
  )(*args)


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis", "block_tokens", "num_warps", "interpret"))
def quantize_pack(x: jax.Array, lengths: jax.Array, *, bits: int, group: int, axis: str,
                  block_tokens: int | None = None, num_warps: int = 4, interpret: bool = False):
  """Quantizes and packs x in one Pallas (Triton) kernel; bit-identical to `quantize_pack_reference`.

  Args:
    x: [B, K, S, H] float32 or bfloat16 (any float; computed in f32). H must be a power of 2.
    lengths: i32[B, K]; token s of head (b, k) is valid iff s < lengths[b, k]. Invalid tokens never enter a
      group's min/max and get code 0.
    bits: 2, 3, 4 or 8.
    group: power of 2; S must be a multiple of it for axis="channel", H for axis="token".
    axis: "channel" (groups of tokens per channel, keys) or "token" (groups of channels per token, values).
    block_tokens: tokens per program (power of 2; a multiple of group for "channel"). Default 64 (or group).
    num_warps: Triton warps per program.
    interpret: run the kernel in the Pallas interpreter (CPU tests).

  Returns:
    codes: u8[B, K, S, H * bits / 8] packed as described in the module docstring.
    scale, zero: f16[B, K, S / group, H] for "channel", f16[B, K, S, H / group] for "token".
  """
  t = check_quantize_pack_args(x.shape, x.dtype, lengths.shape, bits=bits, group=group, axis=axis,
                               block_tokens=block_tokens, num_warps=num_warps)
  return _pallas_quantize(x, lengths, None, bits=bits, group=group, axis=axis, block_tokens=t,
                          num_warps=num_warps, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis", "block_tokens", "interpret"))
def _quantize_pack_into(x, lengths, init, *, bits, group, axis, block_tokens=None, interpret=False):
  """`quantize_pack` writing into the given (codes, scale, zero): lets tests prove every element is written."""
  t = check_quantize_pack_args(x.shape, x.dtype, lengths.shape, bits=bits, group=group, axis=axis,
                               block_tokens=block_tokens)
  return _pallas_quantize(x, lengths, init, bits=bits, group=group, axis=axis, block_tokens=t, num_warps=4,
                          interpret=interpret)


# ---------------------------------------------------------------------------------------------------------------
# Reference


@functools.partial(jax.jit, static_argnames=("bits", "group", "axis"))
def quantize_pack_reference(x: jax.Array, lengths: jax.Array, *, bits: int, group: int, axis: str):
  """Plain-jnp `quantize_pack`: same arguments (no power-of-2 limits) and outputs, from the one quantizer
  reference (pallas_kernels.quant_reference)."""
  _check_common(x.shape, x.dtype, lengths.shape, bits, group, axis)
  valid = jnp.arange(x.shape[2]) < lengths[..., None]  # bool[B, K, S]
  return _ref.quantize(x, valid, bits=bits, group=group, axis=axis)
