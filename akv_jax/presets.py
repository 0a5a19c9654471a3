"""Named policies. A preset named for a ratio (hybrid_8x) is a byte target: compress solves its keep for the shape
it sees (layers, K, H, S and the decode reserve; akv_jax.ratios.resolve_target), so its held arrays measure the
named ratio within 3% on any model whose guard bands leave room for it, and compress raises, naming what is
reachable, where they do not. Its `keep` is the recipe's fixed form, `preset.with_target(None)`: the keep that
gives about the named ratio on a 32-layer, H = 128 cache at 32k, for shapes too small for the target (tests).

Hybrid presets follow MiniKV's recipe (select once at prefill, then KIVI 2-bit) with this library's guard bands:
4 bf16 sinks, a 128-token bf16 recent window (KIVI's residual; 64 for hybrid_12x, where its fixed cost
would otherwise dominate at 8k) that also holds the SnapKV observation window,
and layer 0 kept at more bits as a sensitive-layer guard band (a default, not yet tuned on a model).

Storage modifiers follow a preset's name, each after a "+": `rot` stores keys and values rotated
(akv_jax.rotation, seed 0; `rot<seed>` for another), `out<n>` holds n outlier key channels per kv head at 16 bits
beside the codes (akv_jax.outliers). "kivi2+rot+out4" is kivi2 with both.
"""

from __future__ import annotations

import dataclasses
import re

from akv_jax.policy import Guards, Policy
from akv_jax.quant import QuantSpec
from akv_jax.selection import (H2O, TOVA, AdaKV, Adaptive, ExpectedAttention, KNorm, KVzip, Pyramid, SnapKV,
                               Streaming, Uniform)


def _kivi(bits: int) -> dict:
  """KIVI storage: keys per channel and values per token, groups of 32."""
  return dict(keys=QuantSpec(bits=bits, group=32, axis="channel"), values=QuantSpec(bits=bits, group=32, axis="token"))


def _guards(recent: int = 128, **kw) -> Guards:
  return Guards(recent=recent, **kw)


PRESETS: dict[str, Policy] = {
    "full": Policy(name="full"),
    "streaming": Policy(name="streaming", scorer=Streaming(), budget=Uniform(keep=0.25)),
    "snapkv": Policy(name="snapkv", scorer=SnapKV(window=32), budget=Uniform(keep=0.25), guards=Guards(recent=32)),
    "pyramidkv": Policy(name="pyramidkv", scorer=SnapKV(window=32), budget=Pyramid(keep=0.25),
                        guards=Guards(recent=32)),
    "adakv": Policy(name="adakv", scorer=SnapKV(window=32), budget=AdaKV(keep=0.25), guards=Guards(recent=32)),
    # AdaKV's split across the layers too, per request: one page pool per layer group (akv_jax.pooled).
    "adaptive": Policy(name="adaptive", scorer=SnapKV(window=32), budget=Adaptive(keep=0.25),
                       guards=Guards(recent=32)),
    "h2o": Policy(name="h2o", scorer=H2O(), budget=Uniform(keep=0.2), guards=Guards(recent=0, recent_frac=0.1)),
    "tova": Policy(name="tova", scorer=TOVA(), budget=Uniform(keep=0.25), guards=Guards(recent=32)),
    "knorm": Policy(name="knorm", scorer=KNorm(), budget=Uniform(keep=0.25), guards=Guards(recent=32)),
    "expected_attention": Policy(name="expected_attention", scorer=ExpectedAttention(), budget=Uniform(keep=0.25),
                                 guards=Guards(recent=32)),
    # KVzip needs the model's reconstruction pass (models.prefill_many(..., reconstruction=...)); its keys are
    # ranked across the heads of a layer, as kvpress ranks them across heads (and layers).
    "kvzip": Policy(name="kvzip", scorer=KVzip(), budget=AdaKV(keep=0.25), guards=Guards(recent=32)),
    "kivi2": Policy(name="kivi2", guards=_guards(), **_kivi(2)),
    # 3 bits: a 2-bit and a 1-bit plane (pallas_kernels.quant_reference.pack), read by every path; the fused
    # decode kernel needs H >= 128 for them (8 sub-blocks of H/8, each a 16-wide dot).
    "kivi3": Policy(name="kivi3", guards=_guards(), **_kivi(3)),
    "kivi4": Policy(name="kivi4", guards=_guards(), **_kivi(4)),
    "hybrid_5x": Policy(name="hybrid_5x", scorer=SnapKV(window=32), budget=Uniform(keep=0.56, target=5),
                        guards=_guards(layers=(0,), bits=8), **_kivi(4)),
    "hybrid_8x": Policy(name="hybrid_8x", scorer=SnapKV(window=32), budget=Pyramid(keep=0.55, target=8),
                        guards=_guards(layers=(0,), bits=4), **_kivi(2)),
    "hybrid_12x": Policy(name="hybrid_12x", scorer=SnapKV(window=32), budget=AdaKV(keep=0.355, target=12),
                         guards=_guards(recent=64, layers=(0,), bits=4), **_kivi(2)),
}


def fixed(name: str) -> Policy:
  """The preset called `name` at its fixed keep, without a byte target (`get(name).with_target(None)`): what a
  shape too small for the named ratio (a few hundred tokens, in tests) can still compress with."""
  return get(name).with_target(None)


def names() -> tuple[str, ...]:
  return tuple(PRESETS)


_MODIFIER = re.compile(r"(rot)(\d*)|(out)(\d+)")


def _modified(pol: Policy, name: str, modifier: str) -> Policy:
  m = _MODIFIER.fullmatch(modifier)
  if m is None:
    raise ValueError(f"policy {name!r}: unknown storage modifier {modifier!r}; use rot, rot<seed> or out<n>")
  if m.group(1):
    return dataclasses.replace(pol, rotation=int(m.group(2) or 0))
  if pol.keys is None:
    raise ValueError(f"policy {name!r}: +{modifier} holds outlier key channels beside quantized keys, but "
                     f"{pol.name!r} keeps its keys in bf16")
  return dataclasses.replace(pol, keys=dataclasses.replace(pol.keys, outliers=int(m.group(4))))


def get(name: str) -> Policy:
  """The preset policy called `name` (see `names()`), with any storage modifiers ("kivi2+rot+out4")."""
  base, *modifiers = name.split("+")
  try:
    pol = PRESETS[base]
  except KeyError:
    raise ValueError(f"unknown preset {base!r}; choose one of {', '.join(PRESETS)}") from None
  for modifier in modifiers:
    pol = _modified(pol, name, modifier)
  return dataclasses.replace(pol, name=name) if modifiers else pol
