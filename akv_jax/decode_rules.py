"""Decode rules: what a compressed cache does with the tokens decoding appends (akv_jax.decode.append).

A rule is a frozen, hashable dataclass held by the policy. `KiviResidual` never drops a token: new tokens enter
the bf16 recent window and the oldest leave it into the (quantized) body, which was sized at prefill for the
tokens decoding will add. `SlidingWindow` (StreamingLLM) and `HeavyHitter` (H2O) bound the memory instead and
evict; `HeavyHitter` keeps each slot's accumulated attention as its state (CompressedKV.scores, present exactly
when the policy's rule accumulates; akv.append checks that the two agree).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar


@dataclasses.dataclass(frozen=True)
class DecodeRule:
  """Base of the decode rules.

  Class attributes:
    name: registry name.
    evicting: memory stays bounded; a token leaving the recent window may be dropped (bf16 body only).
    accumulates: the cache carries each slot's accumulated attention (initialized from the prefill scores and
      grown by `akv.observe` after every attention step).
  """

  name: ClassVar[str] = ""
  evicting: ClassVar[bool] = False
  accumulates: ClassVar[bool] = False


@dataclasses.dataclass(frozen=True)
class KiviResidual(DecodeRule):
  """KIVI's residual rule: values leave the bf16 window one at a time, keys a whole quantization group at a time."""

  name = "kivi_residual"


@dataclasses.dataclass(frozen=True)
class SlidingWindow(DecodeRule):
  """StreamingLLM: the token leaving the recent window is dropped."""

  name = "sliding_window"
  evicting = True


@dataclasses.dataclass(frozen=True)
class HeavyHitter(DecodeRule):
  """H2O: the token leaving the window is kept only if its accumulated attention beats the weakest body token,
  which it replaces."""

  name = "heavy_hitter"
  evicting = True
  accumulates = True


DECODE_RULES: dict[str, type[DecodeRule]] = {cls.name: cls for cls in (KiviResidual, SlidingWindow, HeavyHitter)}
