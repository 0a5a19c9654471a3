"""Maps a CompressedKV onto the fused Pallas decode-attention kernel (pallas_kernels.decode_attention).

The kernel takes plain arrays; this module is the one place that knows how a CompressedKV's fields become them:
the body's packing and grouping become a static `Format`, the per-head fills become the kernel's lengths, and
the values of recent slots whose values already sit in the body (KIVI's residual rule, at most one key group of
them) are dequantized here into a small `patch` so the kernel never needs the body's value order.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from akv_jax import body as _body
from akv_jax import outliers as _outliers
from akv_jax import validation
from akv_jax.cache import CompressedKV, QuantizedTensor
from pallas_kernels import decode as _da
from pallas_kernels import quant_reference as _quant_ref


def body_format(ckv: CompressedKV) -> _da.Format:
  """The kernel's static view of a cache's body; ValueError for layouts the kernel does not read."""
  fields = {}
  if isinstance(ckv.body_k, QuantizedTensor):
    if ckv.body_k.axis != "channel":
      raise ValueError(f"the Pallas kernel reads keys quantized per channel (KIVI); this cache's keys are "
                       f"quantized per {ckv.body_k.axis!r}")
    fields.update(key_bits=ckv.body_k.bits, key_group=ckv.body_k.group, key_outliers=ckv.body_k.num_outliers)
  if isinstance(ckv.body_v, QuantizedTensor):
    if ckv.body_v.axis != "token":
      raise ValueError(f"the Pallas kernel reads values quantized per token (KIVI); this cache's values are "
                       f"quantized per {ckv.body_v.axis!r}")
    fields.update(value_bits=ckv.body_v.bits, value_group=ckv.body_v.group)
  if ckv.paged:
    fields.update(page_size=ckv.page_size)
  return _da.Format(**fields)


def check_supported(q: jax.Array, ckv: CompressedKV, return_probs: bool) -> None:
  """ValueError naming what the fused kernel cannot do for this call."""
  if q.ndim != 3:
    raise ValueError(f"the kernel attends one query token per row (q [B, N, H]); got q of shape {q.shape}; use "
                     "implementation='reference' for several query tokens")
  if return_probs:
    raise ValueError("the kernel does not return per-slot probabilities (H2O); use implementation='reference' "
                     "with return_probs=True")
  body_format(ckv)
  h = ckv.head_dim
  for name, t in (("keys", ckv.body_k), ("values", ckv.body_v)):
    n = _quant_ref.sub_block_count(t.bits) if isinstance(t, QuantizedTensor) else 0
    if n and h // n < 16:
      raise ValueError(f"head dim {h} is too small for the Pallas kernel with {t.bits}-bit {name} (each of the "
                       f"{n} packed sub-blocks needs >= 16 channels)")


def why_unsupported(q: jax.Array, ckv: CompressedKV, return_probs: bool) -> str | None:
  """Why the fused kernel cannot run this call, or None when it can."""
  try:
    check_supported(q, ckv, return_probs)
  except ValueError as e:
    return str(e)
  return None


def supported(q: jax.Array, ckv: CompressedKV, return_probs: bool) -> bool:
  return why_unsupported(q, ckv, return_probs) is None


def _nonempty(x: jax.Array) -> jax.Array:
  """A zero-slot segment becomes one slot (never read: its length is 0); Pallas blocks cannot be empty."""
  return x if x.shape[2] else jnp.zeros((*x.shape[:2], 1, *x.shape[3:]), x.dtype)


def attend(q: jax.Array, ckv: CompressedKV, *, scale: float | None = None, interpret: bool = False,
           splits: int | None = None, num_warps: int | None = None) -> jax.Array:
  """Fused attention of q [B, N, H] over ckv; the same result as the XLA reference up to f32 rounding.

  splits, num_warps: the kernel's launch settings (default: its own; experiments/kernel_report.py compares them).
  """
  b, kh, h = validation.compressed(ckv)
  validation.queries(q, b, kh, h, name="q", ranks=(3,))
  check_supported(q, ckv, False)
  fmt = body_format(ckv)
  n = q.shape[1]
  g = n // kh
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  qg = (q.astype(jnp.float32) * scale).reshape(b, kh, g, h)

  m = ckv.body_pos.shape[2]
  if m == 0:  # StreamingLLM keeps no body: hand the kernel one unread block
    fmt = _da.Format()
    dummy = jnp.zeros((b, kh, fmt.block, h), ckv.sink_k.dtype)
    body_k, body_v = dummy, dummy
  else:
    body_k = (ckv.body_k.codes, ckv.body_k.scale, ckv.body_k.zero) if fmt.key_bits != _da.RAW else ckv.body_k
    if fmt.key_outliers:
      body_k = (*body_k, ckv.body_k.outliers)
    body_v = (ckv.body_v.codes, ckv.body_v.scale, ckv.body_v.zero) if fmt.value_bits != _da.RAW else ckv.body_v
  # Values run ahead of keys by fewer than one key group (decode.append's residual rule).
  patch_rows = fmt.key_group if (fmt.key_bits != _da.RAW and m) else 0
  slots = ckv.key_fill[..., None] + jnp.arange(patch_rows, dtype=jnp.int32)
  patch_v = _body.gather_values(ckv, slots) if patch_rows else ckv.recent_v
  patch_len = ckv.value_fill - ckv.key_fill if patch_rows else jnp.zeros_like(ckv.key_fill)
  lengths = jnp.stack([jnp.broadcast_to(ckv.sink_fill[:, None], (b, kh)), ckv.key_fill, patch_len,
                       ckv.recent_fill], axis=-1)
  q_out = _outliers.queries_at(qg, ckv.outlier_channels) if fmt.key_outliers else None
  o, mx, l = _da.decode_attention(
      qg, _nonempty(ckv.sink_k), _nonempty(ckv.sink_v), body_k, body_v, _nonempty(ckv.recent_k),
      _nonempty(ckv.recent_v), _nonempty(patch_v), lengths, ckv.page_table if m else None, q_out, fmt=fmt,
      splits=splits, interpret=interpret, **({} if num_warps is None else dict(num_warps=num_warps)))
  return _da.combine(o, mx, l, g).reshape(b, n, h).astype(q.dtype)
