"""The one quantizer reference: asymmetric min/max group quantization, packing and the dequantize formula, in
plain jnp.

Axis legend: S tokens, H head dim; any leading axes (B, K, ...) ride along.

akv_jax.quant (QuantSpec, akv.quantize, akv.dequantize) calls these functions for its jnp path, the fused
quantize-and-pack kernel (pallas_kernels.quantize) and the decode kernel's reference are tested against them, and
the paths that cannot call them (the chunked XLA attention and the fused decode kernel, which unpack sub-blocks in
place) are tied to `dequantize` by tests/library/test_quant.py. It lives with the kernels because they do not
import akv_jax.

Per group: zero = min rounded DOWN to float16, scale = (max - zero) / (2^bits - 1) rounded UP to float16,
code = clip(floor((x - zero) * fl32(1 / scale) + 0.5), 0, 2^bits - 1), x_hat = code * scale + zero.
- Halves round up (floor(x + 0.5)): the rule a Triton kernel can express (it has no round-half-even).
- The float16 roundings keep every element of the group inside [zero16, zero16 + (2^bits - 1) * scale16], so the
  error stays within half a step of the stored scale, and a constant group (scale 0) decodes exactly.
- 1 / scale is `recip_f16` (an integer long division), not an f32 division: XLA:GPU's and Triton's f32 divisions
  are approximate, and codes must be the same on every platform.
- Invalid tokens never enter a group's min/max and get code 0; a group without a valid token gets scale 0, zero 0.

Grouping: axis="channel" groups `group` consecutive tokens of one channel (KIVI keys: scale/zero [..., S / group,
H]); axis="token" groups `group` consecutive channels of one token (KIVI values: [..., S, H / group]).
Packing along H: with n = 8 / bits codes per byte, byte j of a row holds head dims j, j + H/n, ..., j + (n-1) H/n,
head dim i * H/n + j in bits [i * bits, (i + 1) * bits), so each unpacked sub-block is a contiguous head-dim range.
3-bit codes are a 2-bit plane and a 1-bit plane in that layout, side by side (`pack`, `sub_blocks`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

SUPPORTED_BITS = (2, 3, 4, 8)
AXES = ("channel", "token")
SCALE_DTYPE = jnp.float16
_F16_MAG = 0x7FFF


def _check_bits(bits: int) -> None:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")


def codes_per_byte(bits: int) -> int:
  """Codes one byte holds for the byte-aligned widths (2, 4, 8); 3-bit codes are two planes (`pack`)."""
  _check_bits(bits)
  if 8 % bits:
    raise ValueError(f"{bits}-bit codes are not byte-aligned: they are packed as a 2-bit and a 1-bit plane")
  return 8 // bits


def _pack_plane(codes: jax.Array, bits: int) -> jax.Array:
  n = 8 // bits
  h = codes.shape[-1]
  if h % n:
    raise ValueError(f"last axis {h} must be a multiple of {n} to pack {bits}-bit codes")
  blocks = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], n, h // n)
  shifts = (jnp.arange(n, dtype=jnp.uint8) * bits)[:, None]
  # Sub-blocks occupy disjoint bit ranges, so a sum is an OR.
  return jnp.sum(blocks << shifts, axis=-2, dtype=jnp.uint8)


def _unpack_plane(packed: jax.Array, bits: int) -> jax.Array:
  n = 8 // bits
  shifts = (jnp.arange(n, dtype=jnp.uint8) * bits)[:, None]
  mask = jnp.uint8((1 << bits) - 1)
  blocks = (packed[..., None, :] >> shifts) & mask
  return blocks.reshape(*packed.shape[:-1], n * packed.shape[-1])


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs codes u8[..., H] (each < 2^bits) into u8[..., H * bits / 8], sub-block i in bits [i*bits, (i+1)*bits).

  3-bit codes (H a multiple of 8) are two planes side by side: the low two bits packed as 2-bit codes
  (H/4 bytes), then the high bit packed as 1-bit codes (H/8 bytes), 3H/8 bytes in all; `sub_blocks` reads them
  as 8 contiguous head-dim ranges of H/8, each from one byte range of each plane.
  """
  _check_bits(bits)
  if bits != 3:
    return _pack_plane(codes, bits)
  if codes.shape[-1] % 8:
    raise ValueError(f"last axis {codes.shape[-1]} must be a multiple of 8 to pack 3-bit codes")
  codes = codes.astype(jnp.uint8)
  return jnp.concatenate([_pack_plane(codes & 3, 2), _pack_plane(codes >> 2, 1)], axis=-1)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of `pack`: u8[..., H * bits / 8] -> u8[..., H]."""
  _check_bits(bits)
  if bits != 3:
    return _unpack_plane(packed, bits)
  w = packed.shape[-1] // 3          # H/8
  return _unpack_plane(packed[..., :2 * w], 2) | (_unpack_plane(packed[..., 2 * w:], 1) << 2)


def sub_block_count(bits: int) -> int:
  """Contiguous head-dim sub-blocks a packed row unpacks into: 8 / bits, or 8 for 3-bit codes (`sub_blocks`)."""
  _check_bits(bits)
  return 8 if bits == 3 else 8 // bits


def sub_blocks(packed: jax.Array, bits: int) -> list[jax.Array]:
  """The codes of packed u8[..., H * bits / 8] as int32 sub-blocks, each a contiguous head-dim range of equal
  width, in order: 8 / bits blocks of H * bits / 8 for 2, 4 and 8 bits (one shift and mask each), 8 blocks of H/8
  for 3 bits (block m: its low bits from byte range m % 2 of the 2-bit plane at shift 2 (m // 2), its high bit
  from the 1-bit plane at shift m). What the chunked attention and the kernels unpack in place."""
  n = sub_block_count(bits)
  c = packed.astype(jnp.int32)
  if bits != 3:
    return [(c >> (i * bits)) & ((1 << bits) - 1) for i in range(n)]
  w = c.shape[-1] // 3
  low, high = (c[..., :w], c[..., w:2 * w]), c[..., 2 * w:]
  return [((low[m % 2] >> (2 * (m // 2))) & 3) | (((high >> m) & 1) << 2) for m in range(n)]


def group_view(x: jax.Array, group: int, axis: str) -> tuple[jax.Array, int]:
  """[..., S, H] -> ([..., S/g, g, H], -2) for axis="channel" or ([..., S, H/g, g], -1) for "token": the grouped
  view and the axis a group's elements lie along."""
  *lead, s, h = x.shape
  if axis == "channel":
    if s % group:
      raise ValueError(f"token axis {s} is not a multiple of the key group {group}")
    return x.reshape(*lead, s // group, group, h), -2
  if axis != "token":
    raise ValueError(f"axis={axis!r} must be 'channel' or 'token'")
  if h % group:
    raise ValueError(f"head dim {h} is not a multiple of the value group {group}")
  return x.reshape(*lead, s, h // group, group), -1


def f16_bits(v16: jax.Array) -> jax.Array:
  """float16 -> its bit pattern as int32 in [0, 65535] (int16 sign-extends, hence the mask)."""
  return lax.bitcast_convert_type(v16, jnp.int16).astype(jnp.int32) & 0xFFFF


def recip_f16(s16: jax.Array) -> jax.Array:
  """float16 s >= 0 -> fl32(1 / s) as f32, 0 where s is 0 or inf, by integer long division.

  An f32 division is IEEE on XLA:CPU but the approximate div.full.f32 on XLA:GPU as on Triton (openxla/xla#37181),
  so `1 / scale` would give different codes on the two platforms; the reference and the kernel call this instead.

  A normal s with exponent field E is M * 2^(E - 25) with an integer mantissa M in [1024, 2047] (a subnormal is
  shifted into that range), so 1/s = (2^10 / M) * 2^(15 - E), an exact power-of-2 scaling of 2^10 / M in (1/2, 1].
  Its 24-bit significand round(2^34 / M) takes two int32 division steps (2^21 / M, then the remainder shifted by
  13) and a round-half-up on the last remainder, which never ties: 2^34 / M is a midpoint only if M is a power of
  2, and then the remainder is 0.
  """
  u = f16_bits(s16) & _F16_MAG
  e = u >> 10
  f = u & 0x3FF
  # Subnormal: shift the mantissa so its top bit lands on bit 10 (clz of an int32 below 2^10 is >= 22).
  shift = jnp.maximum(lax.clz(jnp.maximum(f, 1)) - 21, 0)
  m = jnp.where(e == 0, f << shift, f | 0x400)
  # 1/s = Q * 2^(p - 24) with Q = round(2^34 / M); p = 15 - e for normals, 14 + shift for subnormals.
  p = jnp.where(e == 0, 14 + shift, 15 - e)
  m = jnp.maximum(m, 1024)  # zero and inf lanes: keep the division well defined, masked below
  q1 = lax.div(jnp.full_like(m, 1 << 21), m)
  r1 = (1 << 21) - q1 * m
  t = r1 << 13
  q2 = lax.div(t, m)
  r2 = t - q2 * m
  q = (q1 << 13) + q2 + (2 * r2 > m).astype(jnp.int32)
  pow2 = lax.bitcast_convert_type((127 + p - 24) << 23, jnp.float32)
  inv = q.astype(jnp.float32) * pow2
  return jnp.where((u == 0) | (e == 31), 0.0, inv)


def _round_toward(x16: jax.Array, target: jax.Array, direction: float) -> jax.Array:
  """Nudges a float16 value one ulp in `direction` where the cast moved it past the f32 `target`."""
  past = (x16.astype(jnp.float32) > target) if direction < 0 else (x16.astype(jnp.float32) < target)
  return jnp.where(past, jnp.nextafter(x16, jnp.asarray(direction * jnp.inf, x16.dtype)), x16)


def quantize(x: jax.Array, valid: jax.Array | None, *, bits: int, group: int, axis: str):
  """x [..., S, H] (any float; computed in f32), valid bool[..., S] or None (all valid) ->
  (packed codes u8[..., S, H * bits / 8], scale f16, zero f16), shapes as in the module docstring."""
  _check_bits(bits)
  g, red = group_view(x.astype(jnp.float32), group, axis)
  valid = jnp.ones(x.shape[:-1], bool) if valid is None else valid
  gv, _ = group_view(jnp.broadcast_to(valid[..., None], x.shape), group, axis)
  empty = ~jnp.any(gv, axis=red)
  mn = jnp.where(empty, 0.0, jnp.min(jnp.where(gv, g, jnp.inf), axis=red))
  mx = jnp.where(empty, 0.0, jnp.max(jnp.where(gv, g, -jnp.inf), axis=red))
  levels = (1 << bits) - 1
  zero16 = _round_toward(mn.astype(SCALE_DTYPE), mn, -1.0)
  scale32 = (mx - zero16.astype(jnp.float32)) / levels
  scale16 = _round_toward(scale32.astype(SCALE_DTYPE), scale32, +1.0)
  zero = jnp.expand_dims(zero16.astype(jnp.float32), red)
  inv = jnp.expand_dims(recip_f16(scale16), red)
  codes = jnp.clip(jnp.floor((g - zero) * inv + 0.5), 0, levels)
  codes = jnp.where(gv, codes, 0).astype(jnp.uint8).reshape(x.shape)
  return pack(codes, bits), scale16, zero16


def dequantize(packed: jax.Array, scale: jax.Array, zero: jax.Array, *, bits: int, group: int, axis: str,
               dtype=jnp.float32) -> jax.Array:
  """The dequantize formula, x_hat = code * scale + zero: packed u8[..., S, H * bits / 8] -> [..., S, H] in dtype
  (computed in f32)."""
  codes = unpack(packed, bits).astype(jnp.float32)
  g, red = group_view(codes, group, axis)
  s = jnp.expand_dims(scale.astype(jnp.float32), red)
  z = jnp.expand_dims(zero.astype(jnp.float32), red)
  return (g * s + z).reshape(codes.shape).astype(dtype)
