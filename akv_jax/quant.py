"""Asymmetric min/max quantization with real bit packing (KIVI layout).

Per group: zero = min, scale = (max - min) / (2^bits - 1), code = floor((x - zero) / scale + 0.5) clipped to
[0, 2^bits - 1], x_hat = code * scale + zero. Halves round up (floor(x + 0.5)) because that is the rule a Triton
kernel can express (it has no round-half-even); the fused quantize kernel and this reference must agree bit for bit.

Scale and zero are stored in float16. They are rounded so that every element of the group stays inside the
representable range [zero16, zero16 + (2^bits - 1) * scale16]: zero rounded down, scale rounded up. That keeps the
per-element error within half a step of the stored scale, and a constant group (scale 0) decodes exactly to its
value instead of dividing 0 by 0.

Grouping: axis="channel" groups `group` consecutive tokens of one channel (KIVI keys, so an outlier channel only
widens its own range); axis="token" groups `group` consecutive channels of one token (KIVI values). Codes are
packed along the head dim for both; see `QuantizedTensor` for the byte layout.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from akv_jax import dispatch
from akv_jax.cache import QuantAxis, QuantizedTensor
from pallas_kernels import quantize as _kernel

SUPPORTED_BITS = (2, 4, 8)
SCALE_DTYPE = jnp.float16


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor (keys or values) is quantized. Frozen and hashable: a static argument."""

  bits: int
  group: int = 32
  axis: QuantAxis = "channel"

  def __post_init__(self):
    if self.bits not in SUPPORTED_BITS:
      raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
    if self.group < 1:
      raise ValueError(f"group={self.group} must be >= 1")
    if self.axis not in ("channel", "token"):
      raise ValueError(f"axis={self.axis!r} must be 'channel' or 'token'")

  def bits_per_element(self) -> float:
    """Effective bits per element including the two 16-bit group parameters."""
    return self.bits + 32 / self.group


def _codes_per_byte(bits: int) -> int:
  if bits not in SUPPORTED_BITS:
    raise ValueError(f"bits={bits} is not supported; use one of {SUPPORTED_BITS}")
  return 8 // bits


def pack(codes: jax.Array, bits: int) -> jax.Array:
  """Packs codes u8[..., H] (each < 2^bits) into u8[..., H * bits / 8], sub-block i in bits [i*bits, (i+1)*bits)."""
  n = _codes_per_byte(bits)
  h = codes.shape[-1]
  if h % n:
    raise ValueError(f"last axis {h} must be a multiple of {n} to pack {bits}-bit codes")
  blocks = codes.astype(jnp.uint8).reshape(*codes.shape[:-1], n, h // n)
  shifts = (jnp.arange(n, dtype=jnp.uint8) * bits)[:, None]
  # Sub-blocks occupy disjoint bit ranges, so a sum is an OR.
  return jnp.sum(blocks << shifts, axis=-2, dtype=jnp.uint8)


def unpack(packed: jax.Array, bits: int) -> jax.Array:
  """Inverse of `pack`: u8[..., H * bits / 8] -> u8[..., H]."""
  n = _codes_per_byte(bits)
  shifts = (jnp.arange(n, dtype=jnp.uint8) * bits)[:, None]
  mask = jnp.uint8((1 << bits) - 1)
  blocks = (packed[..., None, :] >> shifts) & mask
  return blocks.reshape(*packed.shape[:-1], n * packed.shape[-1])


def _group_view(x: jax.Array, group: int, axis: QuantAxis) -> jax.Array:
  """[..., S, H] -> [..., S/g, g, H] (channel) or [..., S, H/g, g] (token)."""
  *lead, s, h = x.shape
  if axis == "channel":
    if s % group:
      raise ValueError(f"token axis {s} is not a multiple of the key group {group}")
    return x.reshape(*lead, s // group, group, h)
  if h % group:
    raise ValueError(f"head dim {h} is not a multiple of the value group {group}")
  return x.reshape(*lead, s, h // group, group)


def _round_toward(x16: jax.Array, target: jax.Array, direction: float) -> jax.Array:
  """Nudges a float16 value one ulp in `direction` where the cast moved it past the f32 `target`."""
  past = (x16.astype(jnp.float32) > target) if direction < 0 else (x16.astype(jnp.float32) < target)
  return jnp.where(past, jnp.nextafter(x16, jnp.asarray(direction * jnp.inf, x16.dtype)), x16)


def _pallas_ok(x: jax.Array, spec: QuantSpec) -> str | None:
  """Why the fused kernel cannot quantize x, or None when it can."""
  if x.ndim != 4:
    return f"x must be [B, K, S, H] for the kernel, got shape {x.shape}"
  h = x.shape[-1]
  if h & (h - 1) or spec.group & (spec.group - 1):
    return f"the kernel needs a power-of-2 head dim and group, got H={h}, group={spec.group}"
  if spec.axis == "channel" and x.shape[2] % spec.group:
    return f"token axis {x.shape[2]} is not a multiple of the key group {spec.group}"
  return None


def quantize(x: jax.Array, spec: QuantSpec, valid: jax.Array | None = None, *, implementation: str | None = None,
             interpret: bool = False) -> QuantizedTensor:
  """Quantizes and packs x: [..., S, H].

  Args:
    x: [..., S, H] tensor (any float dtype; computed in f32).
    spec: bits, group and axis.
    valid: bool[..., S] or None. Invalid tokens (padding, empty slots) never enter a group's min/max; their
      codes are 0. A group with no valid token gets scale 0 and zero 0.
    implementation: "reference" or "xla" (both this function's jnp code), "pallas" (pallas_kernels.quantize_pack,
      bit-identical, for x [B, K, S, H] with every token valid: valid=None), or None: Pallas on a GPU where it
      applies, the jnp code otherwise (decode.append's per-token and per-group writes qualify). An explicit
      "pallas" that cannot run raises (akv_jax.dispatch).
    interpret: run the kernel in interpret mode (CPU tests).
  """
  why = "pass valid=None (the kernel takes every token as valid)" if valid is not None else _pallas_ok(x, spec)
  if dispatch.resolve(implementation, interpret, op="quantize", pallas_why=why) == "pallas":
    b, k, s, _ = x.shape
    codes, scale, zero = _kernel.quantize_pack(x, jnp.full((b, k), s, jnp.int32), bits=spec.bits, group=spec.group,
                                               axis=spec.axis, interpret=interpret)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, bits=spec.bits, group=spec.group, axis=spec.axis)
  xf = x.astype(jnp.float32)
  if valid is None:
    valid = jnp.ones(x.shape[:-1], bool)
  valid_x = jnp.broadcast_to(valid[..., None], x.shape)
  g = _group_view(xf, spec.group, spec.axis)
  gv = _group_view(valid_x, spec.group, spec.axis)
  red = -2 if spec.axis == "channel" else -1
  mn = jnp.min(jnp.where(gv, g, jnp.inf), axis=red)
  mx = jnp.max(jnp.where(gv, g, -jnp.inf), axis=red)
  empty = ~jnp.any(gv, axis=red)
  mn = jnp.where(empty, 0.0, mn)
  mx = jnp.where(empty, 0.0, mx)
  levels = (1 << spec.bits) - 1
  zero16 = _round_toward(mn.astype(SCALE_DTYPE), mn, -1.0)
  scale32 = (mx - zero16.astype(jnp.float32)) / levels
  scale16 = _round_toward(scale32.astype(SCALE_DTYPE), scale32, +1.0)
  zero = jnp.expand_dims(zero16.astype(jnp.float32), red)
  # fl32(1 / scale) (0 where scale is 0) on every platform: XLA:GPU's f32 division is approximate.
  inv = jnp.expand_dims(_kernel.recip_f16(scale16), red)
  codes = jnp.clip(jnp.floor((g - zero) * inv + 0.5), 0, levels)
  codes = jnp.where(gv, codes, 0).astype(jnp.uint8).reshape(x.shape)
  return QuantizedTensor(codes=pack(codes, spec.bits), scale=scale16, zero=zero16,
                         bits=spec.bits, group=spec.group, axis=spec.axis)


def dequantize(qt: QuantizedTensor, dtype=jnp.float32) -> jax.Array:
  """QuantizedTensor -> [..., S, H] in `dtype` (computed in f32)."""
  codes = unpack(qt.codes, qt.bits).astype(jnp.float32)
  g = _group_view(codes, qt.group, qt.axis)
  red = -2 if qt.axis == "channel" else -1
  scale = jnp.expand_dims(qt.scale.astype(jnp.float32), red)
  zero = jnp.expand_dims(qt.zero.astype(jnp.float32), red)
  return (g * scale + zero).reshape(codes.shape).astype(dtype)


def spec_of(qt: QuantizedTensor) -> QuantSpec:
  return QuantSpec(bits=qt.bits, group=qt.group, axis=qt.axis)
