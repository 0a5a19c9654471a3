"""Named policies. A preset named N-x measures between 0.97N and 1.15N with `compression_ratio` at S = 8192 and
S = 32768 (H = 128, 32 layers, bf16 input), which tests/test_presets.py checks from the held arrays.

Hybrid presets follow MiniKV's recipe (select once at prefill, then KIVI 2-bit) with this library's guard bands:
4 bf16 sinks, a 128-token bf16 recent window (KIVI's residual; 64 for hybrid_12x, where its fixed cost
would otherwise dominate at 8k) that also holds the SnapKV observation window,
and layer 0 kept at more bits as a sensitive-layer guard band (a default, not yet tuned on a model).
"""

from __future__ import annotations

from akv_jax.policy import Policy

_KIVI = dict(recent=128, key_group=32, value_group=32, key_axis="channel")

PRESETS: dict[str, Policy] = {
    "full": Policy(name="full"),
    "streaming": Policy(name="streaming", selection="streaming", keep=0.25, n_sink=4),
    "snapkv": Policy(name="snapkv", selection="snapkv", keep=0.25, window=32, recent=32),
    "pyramidkv": Policy(name="pyramidkv", selection="snapkv", budget="pyramid", keep=0.25, window=32, recent=32),
    "adakv": Policy(name="adakv", selection="snapkv", budget="adakv", keep=0.25, window=32, recent=32),
    "h2o": Policy(name="h2o", selection="h2o", keep=0.2, recent=0, recent_frac=0.1),
    "tova": Policy(name="tova", selection="tova", keep=0.25, recent=32),
    "knorm": Policy(name="knorm", selection="knorm", keep=0.25, recent=32),
    "kivi2": Policy(name="kivi2", key_bits=2, value_bits=2, **_KIVI),
    "kivi4": Policy(name="kivi4", key_bits=4, value_bits=4, **_KIVI),
    "hybrid_5x": Policy(name="hybrid_5x", selection="snapkv", keep=0.56, window=32, key_bits=4, value_bits=4,
                        guard_layers=(0,), guard_bits=8, **_KIVI),
    "hybrid_8x": Policy(name="hybrid_8x", selection="snapkv", budget="pyramid", keep=0.55, window=32,
                        key_bits=2, value_bits=2, guard_layers=(0,), guard_bits=4, **_KIVI),
    "hybrid_12x": Policy(name="hybrid_12x", selection="snapkv", budget="adakv", keep=0.355, window=32,
                         key_bits=2, value_bits=2, guard_layers=(0,), guard_bits=4,
                         **{**_KIVI, "recent": 64}),
}


def names() -> tuple[str, ...]:
  return tuple(PRESETS)


def get(name: str) -> Policy:
  """The preset policy called `name` (see `names()`)."""
  try:
    return PRESETS[name]
  except KeyError:
    raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None
