"""Asymmetric min/max quantization with real bit packing (KIVI layout): the policy-facing API.

`QuantSpec` says how a tensor is quantized (bits, group, axis); `quantize` / `dequantize` map between a tensor
and a `QuantizedTensor`. The arithmetic (the group min/max, the float16 roundings, the codes, the packing and the
dequantize formula x_hat = code * scale + zero) is written once, in pallas_kernels.quant_reference, which this
module's jnp path calls and the kernels are tested against; see that module for the exact rules.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from akv_jax import dispatch
from akv_jax import outliers as _outliers
from akv_jax.cache import QuantAxis, QuantizedTensor
from pallas_kernels import quant_reference as _ref
from pallas_kernels import quantize as _kernel
from pallas_kernels.quant_reference import pack as pack
from pallas_kernels.quant_reference import unpack as unpack

SUPPORTED_BITS = _ref.SUPPORTED_BITS
SCALE_DTYPE = _ref.SCALE_DTYPE


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
  """How one tensor (keys or values) is quantized. Frozen and hashable: a static argument.

  outliers: channels per (row, kv head) held at 16 bits beside the codes (akv_jax.outliers; keys quantized per
  channel only), chosen from the prompt at compress time.
  """

  bits: int
  group: int = 32
  axis: QuantAxis = "channel"
  outliers: int = 0

  def __post_init__(self):
    if self.bits not in SUPPORTED_BITS:
      raise ValueError(f"bits={self.bits} is not supported; use one of {SUPPORTED_BITS}")
    if self.group < 1:
      raise ValueError(f"group={self.group} must be >= 1")
    if self.axis not in ("channel", "token"):
      raise ValueError(f"axis={self.axis!r} must be 'channel' or 'token'")
    if not isinstance(self.outliers, int) or self.outliers < 0:
      raise ValueError(f"outliers={self.outliers!r} must be an int >= 0")
    if self.outliers and self.axis != "channel":
      raise ValueError(f"outliers={self.outliers} needs per-channel groups (axis='channel'), got axis={self.axis!r}: "
                       "a cut-out channel decodes to exactly 0 only as a constant channel group")

  def bits_per_element(self) -> float:
    """Effective bits per element including the two 16-bit group parameters."""
    return self.bits + 32 / self.group


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


def quantize(x: jax.Array, spec: QuantSpec, valid: jax.Array | None = None, *, channels: jax.Array | None = None,
             implementation: str | None = None, interpret: bool = False) -> QuantizedTensor:
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
    channels: i32[B, K, O] the outlier channels (akv_jax.outliers) when spec.outliers = O > 0, for x
      [B, K, S, H]: they are cut out (zeroed) before quantizing and held in `outliers` in x's dtype (0 at
      invalid tokens).
    interpret: run the kernel in interpret mode (CPU tests).
  """
  if spec.outliers or channels is not None:
    want = (*x.shape[:-2], spec.outliers)
    if channels is None or x.ndim != 4 or tuple(channels.shape) != want:
      got = None if channels is None else tuple(channels.shape)
      raise ValueError(f"outliers={spec.outliers} needs x [B, K, S, H] and channels i32{list(want)}; got x of "
                       f"shape {x.shape} and channels of shape {got}")
    _outliers.check_count(spec.outliers, x.shape[-1])
    x, held = _outliers.split(x, channels)
    if valid is not None:
      held = jnp.where(valid[..., None], held, jnp.zeros((), held.dtype))
    qt = quantize(x, dataclasses.replace(spec, outliers=0), valid, implementation=implementation,
                  interpret=interpret)
    return dataclasses.replace(qt, outliers=held)
  why = "pass valid=None (the kernel takes every token as valid)" if valid is not None else _pallas_ok(x, spec)
  if dispatch.resolve(implementation, interpret, op="quantize", pallas_why=why) == "pallas":
    b, k, s, _ = x.shape
    codes, scale, zero = _kernel.quantize_pack(x, jnp.full((b, k), s, jnp.int32), bits=spec.bits, group=spec.group,
                                               axis=spec.axis, interpret=interpret)
    return QuantizedTensor(codes=codes, scale=scale, zero=zero, bits=spec.bits, group=spec.group, axis=spec.axis)
  codes, scale, zero = _ref.quantize(x, valid, bits=spec.bits, group=spec.group, axis=spec.axis)
  return QuantizedTensor(codes=codes, scale=scale, zero=zero, bits=spec.bits, group=spec.group, axis=spec.axis)


def dequantize(qt: QuantizedTensor, dtype=jnp.float32, *, channels: jax.Array | None = None) -> jax.Array:
  """QuantizedTensor -> [..., S, H] in `dtype` (computed in f32): the one dequantize formula, with the outlier
  channels (i32[B, K, O], required when the tensor holds outliers) put back."""
  x = _ref.dequantize(qt.codes, qt.scale, qt.zero, bits=qt.bits, group=qt.group, axis=qt.axis, dtype=jnp.float32)
  if qt.outliers is not None:
    if channels is None or tuple(channels.shape) != (*x.shape[:-2], qt.num_outliers):
      raise ValueError(f"this tensor holds {qt.num_outliers} outlier channels: pass their indices, channels "
                       f"i32{[*x.shape[:-2], qt.num_outliers]}, got {None if channels is None else channels.shape}")
    x = _outliers.merge(x, qt.outliers.astype(jnp.float32), channels)
  return x.astype(dtype)


def spec_of(qt: QuantizedTensor) -> QuantSpec:
  return QuantSpec(bits=qt.bits, group=qt.group, axis=qt.axis, outliers=qt.num_outliers)
