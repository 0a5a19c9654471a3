"""Policies: one frozen, hashable description of how a layer's cache is compressed.

A policy composes a token selection (which tokens to keep), a budget rule (how many, per layer and per head),
a quantization spec per layer (how kept tokens are stored) and guard bands (sink tokens, a recent window and
sensitive layers kept at higher precision). It is a static argument everywhere: changing it recompiles, changing
a prompt does not.

`Policy.layout(S, layer, num_layers)` turns the policy into the static capacities of one layer's cache. Budgets
are computed from the cache's static length S (the serving capacity), so rows of a ragged batch share one
compiled program; a row shorter than S keeps what it has.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from akv_jax.quant import QuantSpec, SUPPORTED_BITS
from akv_jax.selection import budgets as _budgets

Selection = Literal["none", "streaming", "snapkv", "h2o", "tova", "knorm"]
BudgetRule = Literal["uniform", "pyramid", "adakv"]
SELECTIONS = ("none", "streaming", "snapkv", "h2o", "tova", "knorm")
BUDGET_RULES = ("uniform", "pyramid", "adakv")
# Selections that need observation queries, and how many of their trailing tokens they read.
QUERY_SELECTIONS = ("snapkv", "h2o", "tova")
# Selections whose scores may come as precomputed attention votes (the prefill kernel returns these).
VOTE_SELECTIONS = ("snapkv", "h2o")


@dataclasses.dataclass(frozen=True)
class Layout:
  """Static capacities of one layer's compressed cache (all in tokens per kv head unless said)."""

  n_sink: int          # Z
  recent: int          # bf16 recent window kept at all times (values exactly this many once enough tokens)
  flush: int           # u: keys leave the recent buffer this many at a time (the key group, or 1)
  recent_capacity: int  # R = recent + flush
  selected: int        # tokens chosen by the selection per head (mean per head for adakv)
  body_capacity: int   # M: logical body slots per head (selected + decode reserve, rounded to flush)
  key_spec: QuantSpec | None
  value_spec: QuantSpec | None
  paged: bool          # AdaKV: body in a shared page pool
  page_size: int       # Q (paged only)
  max_pages: int       # pages one head can address (paged only)
  budget_pages: int    # mean pages per head from the selection budget (paged only)
  reserve_pages: int   # pages per head reserved for decoding (paged only)

  def pool_pages(self, num_kv_heads: int) -> int:
    """Pages in one row's pool: the sum of the head budgets plus every head's decode reserve."""
    return num_kv_heads * (self.budget_pages + self.reserve_pages)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Policy:
  """A compression policy. All fields are static; see README for each method's paper.

  Attributes:
    name: label used in reports.
    selection: token scoring method; "none" keeps every token.
    budget: "uniform" (same count every layer and head), "pyramid" (PyramidKV funnel over layers) or "adakv"
      (head-adaptive inside a layer, stored in a page pool so the layer holds the sum of its head budgets).
    keep: fraction of the S tokens a layer keeps on average, sinks and recent window included.
    n_sink: first tokens always kept in bf16 (StreamingLLM attention sinks).
    recent: most recent tokens always kept in bf16 (guard band; KIVI's residual R; includes the SnapKV
      observation window, which must fit in it).
    recent_frac: recent window as a fraction of S (H2O, StreamingLLM); the window is max(recent, frac * S).
    window: observation window W: the trailing queries that score tokens (SnapKV, AdaKV, PyramidKV).
    kernel_size, pooling, reduce: SnapKV smoothing and window reduction.
    pyramid_beta: PyramidKV funnel steepness.
    adakv_alpha: AdaKV safeguard share of the uniform budget every head keeps.
    adakv_cap: most a head may keep, as a multiple of the mean head budget (sizes the page table).
    key_bits, value_bits: 2, 4, 8, or None for bf16.
    key_group, value_group: quantization group sizes.
    key_axis: "channel" (KIVI: a group is `key_group` tokens of one channel) or "token".
    layer_bits: explicit bits per layer for keys and values (None entries: bf16); overrides the rest.
    guard_layers: layers (negative counts from the end) stored at guard_bits instead of key/value bits.
    guard_bits: bits of guard layers (None: bf16).
  """

  name: str = "custom"
  selection: Selection = "none"
  budget: BudgetRule = "uniform"
  keep: float = 1.0
  n_sink: int = 4
  recent: int = 32
  recent_frac: float = 0.0
  window: int = 32
  kernel_size: int = 7
  pooling: Literal["max", "avg"] = "max"
  reduce: Literal["mean", "sum"] = "mean"
  pyramid_beta: float = 20.0
  adakv_alpha: float = 0.2
  adakv_cap: float = 3.0
  key_bits: int | None = None
  value_bits: int | None = None
  key_group: int = 32
  value_group: int = 32
  key_axis: Literal["channel", "token"] = "channel"
  layer_bits: tuple[int | None, ...] | None = None
  guard_layers: tuple[int, ...] = ()
  guard_bits: int | None = None

  def __post_init__(self):
    if self.selection not in SELECTIONS:
      raise ValueError(f"selection={self.selection!r} is unknown; use one of {SELECTIONS}")
    if self.budget not in BUDGET_RULES:
      raise ValueError(f"budget={self.budget!r} is unknown; use one of {BUDGET_RULES}")
    if not 0.0 < self.keep <= 1.0:
      raise ValueError(f"keep={self.keep} must be in (0, 1]")
    if self.selection == "none" and (self.keep != 1.0 or self.budget != "uniform"):
      raise ValueError(f"selection='none' keeps every token; keep={self.keep} and budget={self.budget!r} "
                       "need a selection method")
    for field in ("n_sink", "recent", "window"):
      if getattr(self, field) < 0:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 0")
    if not 0.0 <= self.recent_frac < 1.0:
      raise ValueError(f"recent_frac={self.recent_frac} must be in [0, 1)")
    if self.selection in ("snapkv",) and self.window < 1:
      raise ValueError(f"window={self.window} must be >= 1 for selection={self.selection!r}")
    if self.window > self.recent and self.selection == "snapkv":
      raise ValueError(f"window={self.window} must not exceed recent={self.recent}: the observation window "
                       "is kept in the bf16 recent window")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size={self.kernel_size} must be odd and >= 1")
    if self.pooling not in ("max", "avg"):
      raise ValueError(f"pooling={self.pooling!r} must be 'max' or 'avg'")
    if self.reduce not in ("mean", "sum"):
      raise ValueError(f"reduce={self.reduce!r} must be 'mean' or 'sum'")
    if not 0.0 <= self.adakv_alpha <= 1.0:
      raise ValueError(f"adakv_alpha={self.adakv_alpha} must be in [0, 1]")
    if self.adakv_cap < 1.0:
      raise ValueError(f"adakv_cap={self.adakv_cap} must be >= 1")
    bit_fields = [("key_bits", self.key_bits), ("value_bits", self.value_bits), ("guard_bits", self.guard_bits)]
    bit_fields += [(f"layer_bits[{i}]", b) for i, b in enumerate(self.layer_bits or ())]
    for field, bits in bit_fields:
      if bits is not None and bits not in SUPPORTED_BITS:
        raise ValueError(f"{field}={bits} is not supported; use one of {SUPPORTED_BITS} or None for bf16")
    if self.key_axis not in ("channel", "token"):
      raise ValueError(f"key_axis={self.key_axis!r} must be 'channel' or 'token'")
    for field in ("key_group", "value_group"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 1")
    if self.evicting and self.quantized:
      raise ValueError(f"selection={self.selection!r} evicts during decoding and keeps a bf16 body; "
                       f"key_bits={self.key_bits}, value_bits={self.value_bits} are not supported with it")
    if self.evicting and self.budget != "uniform":
      raise ValueError(f"selection={self.selection!r} needs budget='uniform', got {self.budget!r}")

  @property
  def evicting(self) -> bool:
    """True for bounded-memory policies that evict during decoding (StreamingLLM, H2O)."""
    return self.selection in ("streaming", "h2o")

  @property
  def quantized(self) -> bool:
    bits = (self.key_bits, self.value_bits, self.guard_bits, *(self.layer_bits or ()))
    return any(b is not None for b in bits)

  def bits_for(self, layer: int, num_layers: int) -> tuple[int | None, int | None]:
    """(key bits, value bits) of one layer; None means bf16."""
    if not 0 <= layer < num_layers:
      raise ValueError(f"layer={layer} is out of range for num_layers={num_layers}")
    if self.layer_bits is not None:
      if len(self.layer_bits) != num_layers:
        raise ValueError(f"layer_bits has {len(self.layer_bits)} entries for num_layers={num_layers}")
      return self.layer_bits[layer], self.layer_bits[layer]
    guards = {g % num_layers for g in self.guard_layers if -num_layers <= g < num_layers}
    if len(guards) != len(self.guard_layers):
      raise ValueError(f"guard_layers={self.guard_layers} has entries out of range for num_layers={num_layers}")
    if layer in guards:
      return self.guard_bits, self.guard_bits
    return self.key_bits, self.value_bits

  def recent_tokens(self, s: int) -> int:
    return max(self.recent, round(self.recent_frac * s))

  def layout(self, s: int, layer: int, num_layers: int, *, reserve: int = 0) -> Layout:
    """Static capacities of layer `layer` for a cache of length S that must absorb `reserve` decoded tokens."""
    if s < 1:
      raise ValueError(f"sequence length S={s} must be >= 1")
    if reserve < 0:
      raise ValueError(f"reserve={reserve} must be >= 0")
    kbits, vbits = self.bits_for(layer, num_layers)
    key_spec = None if kbits is None else QuantSpec(bits=kbits, group=self.key_group, axis=self.key_axis)
    value_spec = None if vbits is None else QuantSpec(bits=vbits, group=self.value_group, axis="token")
    flush = self.key_group if key_spec is not None and key_spec.axis == "channel" else 1
    z = self.n_sink
    if self.selection == "streaming":
      budget = max(round(self.keep * s), z + 1)
      recent = budget - z
    else:
      recent = self.recent_tokens(s)
    if self.selection in ("snapkv",) and self.window > s:
      raise ValueError(f"window={self.window} is longer than the sequence S={s}")
    candidates = max(0, s - z - recent)
    if self.selection == "none":
      selected = candidates
    elif self.selection == "streaming":
      selected = 0
    else:
      total = round(self.keep * s)
      avg = total - z - recent
      if avg < 0:
        raise ValueError(f"keep={self.keep} gives {total} tokens at S={s}, fewer than n_sink={z} plus "
                         f"recent={recent}; raise keep or shrink the guard bands")
      if self.budget == "pyramid":
        selected = _budgets.pyramid_budgets(avg + recent, num_layers, window=recent,
                                            beta=self.pyramid_beta)[layer]
      else:
        selected = avg
      selected = min(selected, candidates)
    paged = self.budget == "adakv"
    # Pages hold whole key groups, and at least 16 slots so the page table stays small next to the pages.
    page_size = flush * -(-16 // flush) if paged else 1
    unit = page_size if paged else flush
    body = _round_up(selected, unit) + (0 if self.evicting else _round_up(reserve, unit))
    if paged:
      budget_pages = _round_up(selected, unit) // unit
      reserve_pages = _round_up(reserve, unit) // unit
      cap_pages = min(max(budget_pages, -(-int(self.adakv_cap * selected) // unit)),
                      _round_up(candidates, unit) // unit)
      max_pages = max(cap_pages, budget_pages) + reserve_pages
      if max_pages == 0:
        raise ValueError(f"keep={self.keep} leaves budget='adakv' no body page at S={s} (layer {layer}) and "
                         "reserve=0: raise keep above the guard bands, or reserve decode room")
      return Layout(z, recent, flush, recent + flush, selected, max_pages * unit, key_spec, value_spec,
                    True, page_size, max_pages, budget_pages, reserve_pages)
    return Layout(z, recent, flush, recent + flush, selected, body, key_spec, value_spec, False, 1, 0, 0, 0)


def _round_up(x: int, unit: int) -> int:
  return -(-x // unit) * unit

