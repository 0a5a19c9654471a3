"""Policies: one frozen, hashable description of how a layer's cache is compressed.

A policy composes five parts, each a frozen dataclass that owns its knobs and their validation:

  scorer   which tokens to keep (akv_jax.selection: StreamingLLM, SnapKV, H2O, TOVA, KNorm, Expected
           Attention, ...; None keeps every token);
  budget   how many, per layer and head, as a keep fraction (Uniform, Pyramid, AdaKV);
  keys, values   how kept tokens are stored (QuantSpec, None for bf16);
  guards   sink tokens, a bf16 recent window, and layers stored at other bits;
  decode   what decoding does with new tokens (KiviResidual, SlidingWindow, HeavyHitter).

It is a static argument everywhere: changing it recompiles, changing a prompt does not.

    Policy(name="snapkv", scorer=SnapKV(window=32), budget=Uniform(keep=0.25), guards=Guards(recent=32))

The flat keywords of earlier versions (selection="snapkv", keep=0.25, window=32, key_bits=2, ...) are still
accepted, by the constructor and by dataclasses.replace, and map onto these parts (`LEGACY_FIELDS`). A part named
by a string (selection="tova", budget="pyramid") starts from that part's defaults, with the flat knobs given
beside it on top (so dataclasses.replace(p, budget="uniform") also resets keep unless keep= is given); knobs
that the policy's parts do not have (window= for TOVA) are ignored, as they always were.

`Policy.layout(S, layer, num_layers)` turns the policy into the static capacities of one layer's cache. Budgets
are computed from the cache's static length S (the serving capacity), so rows of a ragged batch share one
compiled program; a row shorter than S keeps what it has.
"""

from __future__ import annotations

import dataclasses

from akv_jax import outliers as _outliers
from akv_jax.decode_rules import DECODE_RULES, DecodeRule, KiviResidual
from akv_jax.quant import QuantSpec, SUPPORTED_BITS
from akv_jax.selection import base as _scorers
from akv_jax.selection.budgets import BUDGETS, AdaKV, Budget, Uniform
from akv_jax.selection.snapkv import SnapKV


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
class Guards:
  """Guard bands: what is kept at higher precision whatever the scorer and the bits.

  Attributes:
    n_sink: first tokens always kept in bf16 (StreamingLLM attention sinks).
    recent: most recent tokens always kept in bf16 (KIVI's residual window; holds the SnapKV observation window).
    recent_frac: recent window as a fraction of S (H2O, StreamingLLM); the window is max(recent, frac * S).
    layers: layers (negative counts from the end) stored at `bits` instead of the policy's key/value bits.
    bits: bits of those layers (None: bf16).
  """

  n_sink: int = 4
  recent: int = 32
  recent_frac: float = 0.0
  layers: tuple[int, ...] = ()
  bits: int | None = None

  def __post_init__(self):
    for field in ("n_sink", "recent"):
      if getattr(self, field) < 0:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 0")
    if not 0.0 <= self.recent_frac < 1.0:
      raise ValueError(f"recent_frac={self.recent_frac} must be in [0, 1)")
    if self.bits is not None and self.bits not in SUPPORTED_BITS:
      raise ValueError(f"guard_bits={self.bits} is not supported; use one of {SUPPORTED_BITS} or None for bf16")

  def recent_tokens(self, s: int) -> int:
    return max(self.recent, round(self.recent_frac * s))


# Flat keywords of the one-level Policy, and the part each now belongs to.
LEGACY_FIELDS = {
    "selection": "scorer (a registered name, or a Scorer)", "window": "scorer (SnapKV.window)",
    "kernel_size": "scorer (SnapKV.kernel_size)", "pooling": "scorer (SnapKV.pooling)",
    "reduce": "scorer (SnapKV.reduce)", "keep": "budget (.keep)", "pyramid_beta": "budget (Pyramid.beta)",
    "adakv_alpha": "budget (AdaKV.alpha)", "adakv_cap": "budget (AdaKV.cap)", "n_sink": "guards",
    "recent": "guards", "recent_frac": "guards", "guard_layers": "guards (.layers)", "guard_bits": "guards (.bits)",
    "key_bits": "keys (QuantSpec.bits)", "key_group": "keys (QuantSpec.group)", "key_axis": "keys (QuantSpec.axis)",
    "value_bits": "values (QuantSpec.bits)", "value_group": "values (QuantSpec.group)",
}
_SCORER_KNOBS = {"window": "window", "kernel_size": "kernel_size", "pooling": "pooling", "reduce": "reduce"}
_BUDGET_KNOBS = {"keep": "keep", "pyramid_beta": "beta", "adakv_alpha": "alpha", "adakv_cap": "cap"}
_GUARD_KNOBS = {"n_sink": "n_sink", "recent": "recent", "recent_frac": "recent_frac", "guard_layers": "layers",
                "guard_bits": "bits"}


def _check_legacy(legacy: dict) -> None:
  """Range checks of flat keywords, whether or not the policy's parts read them (the old Policy checked all)."""
  for field in ("window",):
    if field in legacy and legacy[field] < 0:
      raise ValueError(f"{field}={legacy[field]} must be >= 0")
  # SnapKV's and AdaKV's own checks, on their knobs given flat, whichever scorer and budget the policy has.
  SnapKV(**{f: legacy[f] for f in ("kernel_size", "pooling", "reduce") if f in legacy})
  AdaKV(**{field: legacy[flat] for flat, field in (("adakv_alpha", "alpha"), ("adakv_cap", "cap")) if flat in legacy})
  for field in ("key_bits", "value_bits"):
    bits = legacy.get(field)
    if bits is not None and bits not in SUPPORTED_BITS:
      raise ValueError(f"{field}={bits} is not supported; use one of {SUPPORTED_BITS} or None for bf16")
  for field in ("key_group", "value_group"):
    if field in legacy and legacy[field] < 1:
      raise ValueError(f"{field}={legacy[field]} must be >= 1")
  if legacy.get("key_axis", "channel") not in ("channel", "token"):
    raise ValueError(f"key_axis={legacy['key_axis']!r} must be 'channel' or 'token'")


def _knobs(obj, legacy: dict, names: dict) -> dict:
  """The flat keywords that name fields of `obj` (a scorer, budget or guards), renamed to those fields."""
  fields = {f.name for f in dataclasses.fields(obj)} if dataclasses.is_dataclass(obj) else set()
  return {field: legacy[flat] for flat, field in names.items() if flat in legacy and field in fields}


def _spec(old: QuantSpec | None, legacy: dict, prefix: str, axis: str | None) -> QuantSpec | None:
  """keys / values after the flat keywords key_bits, key_group, key_axis (value_bits, value_group)."""
  if not any(k.startswith(prefix) for k in legacy):
    return old
  bits = legacy[f"{prefix}bits"] if f"{prefix}bits" in legacy else (old.bits if old else None)
  if bits is None:
    return None
  group = legacy.get(f"{prefix}group", old.group if old else 32)
  return QuantSpec(bits=bits, group=group, axis=axis or legacy.get(f"{prefix}axis", old.axis if old else "channel"))


@dataclasses.dataclass(frozen=True, init=False)
class Policy:
  """A compression policy: the composition of a scorer, a budget rule, key and value storage, guard bands and
  a decode rule (see the module docstring). All parts are static.

  Attributes:
    name: label used in reports.
    scorer: token scorer (akv_jax.selection), or None to keep every token.
    budget: Uniform, Pyramid or AdaKV, with the keep fraction.
    keys, values: QuantSpec of the body's keys and values, or None for bf16. Keys are quantized per channel
      (KIVI) or per token; values always per token.
    guards: sinks, recent window and guard layers (Guards).
    decode: the decode rule; default: the scorer's own (`Scorer.decode_rule`), else KiviResidual.
    layer_bits: explicit bits per layer for keys and values (None entries: bf16); overrides keys, values and
      guard layers, with their group sizes.
    rotation: seed of the rotated storage (akv_jax.rotation: a randomized Hadamard transform per layer and kv
      head on keys and values before they are stored), or None.
  """

  name: str = "custom"
  scorer: _scorers.Scorer | None = None
  budget: Budget = Uniform()
  keys: QuantSpec | None = None
  values: QuantSpec | None = None
  guards: Guards = Guards()
  decode: DecodeRule = KiviResidual()
  layer_bits: tuple[int | None, ...] | None = None
  rotation: int | None = None

  def __init__(self, *, name: str = "custom", scorer: _scorers.Scorer | str | None = None,
               budget: Budget | str | None = None, keys: QuantSpec | None = None, values: QuantSpec | None = None,
               guards: Guards | None = None, decode: DecodeRule | str | None = None,
               layer_bits: tuple[int | None, ...] | None = None, rotation: int | None = None, **legacy):
    unknown = sorted(set(legacy) - set(LEGACY_FIELDS))
    if unknown:
      raise TypeError(f"Policy got unexpected keyword {unknown[0]!r}; its parts are scorer, budget, keys, values, "
                      "guards, decode, layer_bits and rotation")
    _check_legacy(legacy)
    if "selection" in legacy:
      # The flat spelling names the scorer; the decode rule follows it, as it did when it was implied.
      sel = legacy["selection"]
      scorer, decode = (None if sel == "none" else sel), None
    if scorer is not None and not isinstance(scorer, (str, _scorers.Scorer)):
      raise ValueError(f"scorer={scorer!r} is not a Scorer (akv_jax.selection) or a registered name")
    if isinstance(scorer, str):
      if scorer not in _scorers.SCORERS:
        raise ValueError(f"selection={scorer!r} is unknown; use one of {('none', *_scorers.SCORERS)}")
      scorer = _scorers.SCORERS[scorer]()
    if scorer is not None:
      scorer = dataclasses.replace(scorer, **_knobs(scorer, legacy, _SCORER_KNOBS))
    if isinstance(budget, str) or budget is None:
      name_ = budget or "uniform"
      if name_ not in BUDGETS:
        raise ValueError(f"budget={name_!r} is unknown; use one of {tuple(BUDGETS)}")
      budget = BUDGETS[name_]()
    budget = dataclasses.replace(budget, **_knobs(budget, legacy, _BUDGET_KNOBS))
    guards = dataclasses.replace(guards or Guards(), **_knobs(guards or Guards(), legacy, _GUARD_KNOBS))
    keys = _spec(keys, legacy, "key_", None)
    values = _spec(values, legacy, "value_", "token")
    if decode is None:
      decode = DECODE_RULES[scorer.decode_rule if scorer is not None else KiviResidual.name]()
    elif isinstance(decode, str):
      if decode not in DECODE_RULES:
        raise ValueError(f"decode={decode!r} is unknown; use one of {tuple(DECODE_RULES)}")
      decode = DECODE_RULES[decode]()
    if rotation is not None and (not isinstance(rotation, int) or isinstance(rotation, bool) or rotation < 0):
      raise ValueError(f"rotation={rotation!r} must be a seed (an int >= 0) or None")
    for field, value in dict(name=name, scorer=scorer, budget=budget, keys=keys, values=values, guards=guards,
                             decode=decode, layer_bits=None if layer_bits is None else tuple(layer_bits),
                             rotation=rotation).items():
      object.__setattr__(self, field, value)
    self._validate()

  def _validate(self) -> None:
    if self.scorer is None and (self.budget.keep != 1.0 or type(self.budget) is not Uniform):
      raise ValueError(f"selection='none' keeps every token; keep={self.budget.keep} and "
                       f"budget={self.budget.name!r} need a selection method")
    if self.scorer is not None:
      self.scorer.check(recent=self.guards.recent)
    for i, bits in enumerate(self.layer_bits or ()):
      if bits is not None and bits not in SUPPORTED_BITS:
        raise ValueError(f"layer_bits[{i}]={bits} is not supported; use one of {SUPPORTED_BITS} or None for bf16")
    if self.values is not None and self.values.axis != "token":
      raise ValueError(f"values are quantized per token; got values axis {self.values.axis!r}")
    if self.decode.evicting and self.quantized:
      raise ValueError(f"selection={self.selection!r} with decode rule {self.decode.name!r} evicts during "
                       f"decoding and keeps a bf16 body; key_bits={self.key_bits}, value_bits={self.value_bits} "
                       "are not supported with it")
    if self.decode.evicting and type(self.budget) is not Uniform:
      raise ValueError(f"decode rule {self.decode.name!r} (selection={self.selection!r}) needs budget='uniform', "
                       f"got {self.budget.name!r}")

  # Read-only views in the flat vocabulary (reports, configs and older callers read these).
  @property
  def selection(self) -> str:
    return "none" if self.scorer is None else self.scorer.name

  @property
  def keep(self) -> float:
    return self.budget.keep

  @property
  def window(self) -> int | None:
    """The scorer's observation window (SnapKV), or None for scorers without one."""
    return getattr(self.scorer, "window", None)

  @property
  def n_sink(self) -> int:
    return self.guards.n_sink

  @property
  def recent(self) -> int:
    return self.guards.recent

  @property
  def key_bits(self) -> int | None:
    return None if self.keys is None else self.keys.bits

  @property
  def value_bits(self) -> int | None:
    return None if self.values is None else self.values.bits

  @property
  def evicting(self) -> bool:
    """True for bounded-memory policies that evict during decoding (StreamingLLM, H2O)."""
    return self.decode.evicting

  @property
  def quantized(self) -> bool:
    bits = (self.key_bits, self.value_bits, self.guards.bits, *(self.layer_bits or ()))
    return any(b is not None for b in bits)

  def needs(self, s: int) -> _scorers.Needs:
    """What the policy's scorer reads for a prompt capacity of S tokens (nothing when it keeps every token), and
    the observation queries that rank outlier key channels (akv_jax.outliers) when it has none of its own."""
    needs = _scorers.Needs() if self.scorer is None else self.scorer.needs(s)
    if self.keys is not None and self.keys.outliers and not needs.queries and needs.reconstruction is None:
      needs = dataclasses.replace(needs, queries=min(_outliers.QUERIES, s))
    return needs

  def to_dict(self) -> dict:
    """A JSON-ready description: each part with its registry name and its knobs."""
    def part(obj):
      if obj is None:
        return None
      return {"name": obj.name, **dataclasses.asdict(obj)} if hasattr(obj, "name") else dataclasses.asdict(obj)
    return dict(name=self.name, scorer=part(self.scorer), budget=part(self.budget), keys=part(self.keys),
                values=part(self.values), guards=dataclasses.asdict(self.guards), decode=part(self.decode),
                layer_bits=None if self.layer_bits is None else list(self.layer_bits), rotation=self.rotation)

  def with_keep(self, keep: float) -> Policy:
    """The same recipe keeping `keep` of the tokens (a byte target, if any, is dropped: keep is now fixed)."""
    return dataclasses.replace(self, budget=dataclasses.replace(self.budget, keep=keep, target=None))

  def with_target(self, target: float | None) -> Policy:
    """The same recipe held to a compression ratio `target` on whatever shape it compresses (None: its keep)."""
    return dataclasses.replace(self, budget=dataclasses.replace(self.budget, target=target))

  def bits_for(self, layer: int, num_layers: int) -> tuple[int | None, int | None]:
    """(key bits, value bits) of one layer; None means bf16."""
    if not 0 <= layer < num_layers:
      raise ValueError(f"layer={layer} is out of range for num_layers={num_layers}")
    if self.layer_bits is not None:
      if len(self.layer_bits) != num_layers:
        raise ValueError(f"layer_bits has {len(self.layer_bits)} entries for num_layers={num_layers}")
      return self.layer_bits[layer], self.layer_bits[layer]
    layers = self.guards.layers
    guards = {g % num_layers for g in layers if -num_layers <= g < num_layers}
    if len(guards) != len(layers):
      raise ValueError(f"guard_layers={layers} has entries out of range for num_layers={num_layers}")
    if layer in guards:
      return self.guards.bits, self.guards.bits
    return self.key_bits, self.value_bits

  def specs_for(self, layer: int, num_layers: int) -> tuple[QuantSpec | None, QuantSpec | None]:
    """(key spec, value spec) of one layer: its bits with the policy's group sizes (32 where none is set)."""
    kbits, vbits = self.bits_for(layer, num_layers)
    kgroup, kaxis, kout = (self.keys.group, self.keys.axis, self.keys.outliers) if self.keys else (32, "channel", 0)
    vgroup = self.values.group if self.values else 32
    return (None if kbits is None else QuantSpec(bits=kbits, group=kgroup, axis=kaxis, outliers=kout),
            None if vbits is None else QuantSpec(bits=vbits, group=vgroup, axis="token"))

  def recent_tokens(self, s: int) -> int:
    return self.guards.recent_tokens(s)

  def layout(self, s: int, layer: int, num_layers: int, *, reserve: int = 0) -> Layout:
    """Static capacities of layer `layer` for a cache of length S that must absorb `reserve` decoded tokens."""
    if s < 1:
      raise ValueError(f"sequence length S={s} must be >= 1")
    if reserve < 0:
      raise ValueError(f"reserve={reserve} must be >= 0")
    if self.budget.target is not None:   # its keep is not what it holds: only the shape decides that
      raise ValueError(f"policy {self.name!r} has target={self.budget.target}x, which compress resolves for the "
                       "cache's shape; lay out akv.ratios.resolve_target(policy, shape) instead")
    key_spec, value_spec = self.specs_for(layer, num_layers)
    flush = key_spec.group if key_spec is not None and key_spec.axis == "channel" else 1
    z = self.n_sink
    scorer = self.scorer
    window_only = scorer is not None and scorer.recency_only
    if window_only:
      budget = max(round(self.keep * s), z + 1)
      recent = budget - z
    else:
      recent = self.recent_tokens(s)
    if scorer is not None:
      scorer.check_length(s)
    candidates = max(0, s - z - recent)
    if scorer is None:
      selected = candidates
    elif window_only:
      selected = 0
    else:
      total = round(self.keep * s)
      avg = total - z - recent
      if avg < 0:
        raise ValueError(f"keep={self.keep} gives {total} tokens at S={s}, fewer than n_sink={z} plus "
                         f"recent={recent}; raise keep or shrink the guard bands")
      selected = min(self.budget.layer_selected(avg, recent, layer, num_layers), candidates)
    paged = self.budget.paged
    # Pages hold whole key groups, and at least 16 slots so the page table stays small next to the pages.
    page_size = flush * -(-16 // flush) if paged else 1
    unit = page_size if paged else flush
    body = _round_up(selected, unit) + (0 if self.evicting else _round_up(reserve, unit))
    if paged:
      budget_pages = _round_up(selected, unit) // unit
      reserve_pages = _round_up(reserve, unit) // unit
      cap_pages = min(max(budget_pages, -(-int(self.budget.cap * selected) // unit)),
                      _round_up(candidates, unit) // unit)
      max_pages = max(cap_pages, budget_pages) + reserve_pages
      if max_pages == 0:
        raise ValueError(f"keep={self.keep} leaves budget={self.budget.name!r} no body page at S={s} (layer "
                         f"{layer}) and reserve=0: raise keep above the guard bands, or reserve decode room")
      return Layout(z, recent, flush, recent + flush, selected, max_pages * unit, key_spec, value_spec,
                    True, page_size, max_pages, budget_pages, reserve_pages)
    return Layout(z, recent, flush, recent + flush, selected, body, key_spec, value_spec, False, 1, 0, 0, 0)


def _round_up(x: int, unit: int) -> int:
  return -(-x // unit) * unit

