"""Token budgets: how many tokens each layer (PyramidKV) or each kv head of a layer (AdaKV) keeps.

Axis legend: B batch, K kv heads, S key length, L layers, C average per-head budget of a layer.

Layer budgets are static Python ints (they fix array shapes). Head budgets are i32 arrays computed from the
scores; their knobs (total, alpha, granularity, cap) are static Python values, validated before tracing.

A policy holds one budget rule, a frozen dataclass owning the keep fraction and its own knobs: `Uniform`,
`Pyramid` (PyramidKV), `AdaKV`, or `Adaptive` (AdaKV across the layers of a group, per request).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import ClassVar

import jax
import jax.numpy as jnp


def uniform_budgets(avg: int, num_layers: int) -> tuple[int, ...]:
  """The same budget `avg` for every layer (whatever `avg` counts: the caller decides about the window).

  Args:
    avg: tokens per layer, >= 0.
    num_layers: L >= 1.

  Returns:
    (avg,) * L.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if avg < 0:
    raise ValueError(f"avg must be >= 0, got {avg}")
  return (int(avg),) * int(num_layers)


def pyramid_budgets(avg: int, num_layers: int, *, window: int, beta: float = 20) -> tuple[int, ...]:
  """PyramidKV's funnel: selected tokens per layer, most at the bottom, excluding the W window tokens.

  With B = avg - window: min = B // beta, max = 2B - min, step = (max - min) // (L - 1), and layer l keeps
  max - l * step. The integer step makes the mean at least B (up to about (L - 1) / 2 tokens above it); a
  single layer keeps B. Each layer keeps the W window tokens on top of its count.

  Unlike the reference code this never falls back to uniform budgets for short prompts: clamping a budget to
  the tokens a prompt actually has is the caller's job and must be visible there.

  Args:
    avg: average per-layer budget C including the window (static).
    num_layers: L >= 1.
    window: W >= 0, the observation-window tokens every layer keeps anyway.
    beta: funnel flatness, > 0 (20 in the paper).

  Returns:
    L non-increasing ints >= 0.
  """
  if num_layers < 1:
    raise ValueError(f"num_layers must be >= 1, got {num_layers}")
  if window < 0:
    raise ValueError(f"window must be >= 0, got {window}")
  if avg < window:
    raise ValueError(f"avg={avg} is smaller than window={window}: no budget left for selected tokens")
  if beta <= 0:
    raise ValueError(f"beta must be > 0, got {beta}")
  b = int(avg) - int(window)
  if num_layers == 1:
    return (b,)
  lo = int(b // beta)
  hi = 2 * b - lo
  step = (hi - lo) // (num_layers - 1)
  return tuple(hi - layer * step for layer in range(num_layers))


def _level_fill(deficit: jax.Array, room: jax.Array, order: jax.Array) -> jax.Array:
  """Deals `deficit` units one at a time, round-robin over heads with room, each round in priority order.

  Closed form of that loop: every head gets min(room, level) for the highest level the deficit pays for in
  full, and the units left over (fewer than the heads still with room) go to the first such heads by
  priority. Ints throughout, so the result sums to min(deficit, sum(room)) exactly.

  Args:
    deficit: i32[B] units to hand out, >= 0.
    room: i32[B, K] units each head may still take, >= 0.
    order: i32[B, K] heads in priority order, a permutation of 0..K-1 per row.

  Returns:
    i32[B, K] extra units per head.
  """
  k = room.shape[1]
  sorted_room = jnp.sort(room, axis=1)
  # filled[j] = units used when the level equals the (j+1)-th smallest room: the j+1 smallest heads are full,
  # the others hold that level each.
  filled = jnp.cumsum(sorted_room, axis=1) + (k - 1 - jnp.arange(k)) * sorted_room
  full = jnp.sum(filled <= deficit[:, None], axis=1)  # heads completely filled, in room order
  base_level = jnp.where(full > 0, jnp.take_along_axis(sorted_room, jnp.maximum(full - 1, 0)[:, None], 1)[:, 0], 0)
  base_used = jnp.where(full > 0, jnp.take_along_axis(filled, jnp.maximum(full - 1, 0)[:, None], 1)[:, 0], 0)
  open_heads = jnp.maximum(k - full, 1)
  level = base_level + jnp.where(full < k, (deficit - base_used) // open_heads, 0)
  extra = jnp.minimum(room, level[:, None])
  left = deficit - jnp.sum(extra, axis=1)
  # Among heads with room above the level, the first `left` in priority order take one more unit.
  more = room > level[:, None]
  more_sorted = jnp.take_along_axis(more, order, axis=1)
  rank_sorted = jnp.cumsum(more_sorted, axis=1) - 1
  give_sorted = more_sorted & (rank_sorted < left[:, None])
  give = jnp.zeros_like(more).at[jnp.arange(room.shape[0])[:, None], order].set(give_sorted)
  return extra + give.astype(extra.dtype)


def adakv_head_budgets(scores: jax.Array, total: int, *, alpha: float = 0.2, granularity: int = 1,
                       cap: int | None = None, available: jax.Array | None = None) -> jax.Array:
  """AdaKV: split a layer's `total` tokens among its kv heads, row by row.

  Per row: mask each head's scores below its `cap`-th best (ties broken by lower slot), take the global top
  `total` of all heads' candidates (finite scores; ties by lower head, then lower slot), let count_h be how many
  land in head h, and set budget_h = count_h * (1 - alpha) + alpha * C with C = total / K.

  Rounding, in units of `granularity` (a page, so a paged pool wastes nothing):
    1. floor each budget, then clamp it into [0, upper_h], upper_h = min(cap // granularity,
       ceil(available_h / granularity)) when those are given;
    2. hand the remaining units out one at a time, round-robin over heads still below upper_h, in order of
       decreasing fractional remainder (ties: lower head first). Without clamping this is exactly
       largest-remainder rounding.
  Every row therefore sums to exactly `total` whenever sum(upper_h) * granularity >= total, which always holds
  without `available` (a cap that makes it impossible is rejected up front). With `available`, a row that
  cannot use `total` gets every head's upper bound and sums to less: the pool stays sized for `total`, the
  surplus simply stays empty.

  Args:
    scores: f32[B, K, S] per-head scores, -inf for slots that are not candidates (padding).
    total: K * C tokens for the layer (static), a multiple of `granularity`.
    alpha: share of the uniform budget every head keeps, in [0, 1] (static).
    granularity: budgets are multiples of this (static, >= 1).
    cap: upper bound on each head's budget (static), or None.
    available: i32[B, K] tokens each head actually has, or None.

  Returns:
    i32[B, K] budgets, multiples of `granularity`.

  Only `total` fixes a shape, so after validating the static knobs here the allocation runs as one jitted
  function with alpha, granularity and cap as traced scalars: sweeping them does not recompile.
  """
  if scores.ndim != 3:
    raise ValueError(f"scores must be [B, K, S], got shape {scores.shape}")
  b, kh, s = scores.shape
  if total < 0:
    raise ValueError(f"total must be >= 0, got {total}")
  if granularity < 1:
    raise ValueError(f"granularity must be >= 1, got {granularity}")
  if total % granularity:
    raise ValueError(f"total={total} is not a multiple of granularity={granularity}")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"alpha must be in [0, 1], got {alpha}")
  if cap is not None:
    if cap < 0:
      raise ValueError(f"cap must be >= 0, got {cap}")
    if kh * (cap // granularity) * granularity < total:
      raise ValueError(f"cap={cap} (in multiples of granularity={granularity}) over K={kh} heads cannot hold "
                       f"total={total}")
  if available is not None and available.shape != (b, kh):
    raise ValueError(f"available must be [B, K] = {(b, kh)}, got shape {available.shape}")

  # No cap = a cap no head can reach (every slot, and every unit of the total).
  cap_tokens = max(s, total) if cap is None else cap
  if available is None:
    available = jnp.full((b, kh), total, jnp.int32)
  return _allocate(scores, available, jnp.float32(alpha), jnp.int32(granularity), jnp.int32(cap_tokens),
                   total=total)


@functools.partial(jax.jit, static_argnames=("total",))
def _allocate(scores: jax.Array, available: jax.Array, alpha: jax.Array, granularity: jax.Array,
              cap: jax.Array, *, total: int) -> jax.Array:
  """The array part of `adakv_head_budgets`; scores: [B, K, S], available: i32[B, K], scalars traced."""
  b, kh, s = scores.shape
  scores = scores.astype(jnp.float32)
  # Rank inside each head by a stable sort so that ties resolve the same way on every backend.
  order = jnp.argsort(-scores, axis=2, stable=True)
  rank = jnp.argsort(order, axis=2, stable=True)
  candidate = (scores > -jnp.inf) & (rank < cap)
  flat = jnp.where(candidate, scores, -jnp.inf).reshape(b, kh * s)
  top = jnp.argsort(-flat, axis=1, stable=True)[:, :min(total, kh * s)]
  hit = jnp.take_along_axis(flat, top, axis=1) > -jnp.inf
  counts = jnp.zeros((b, kh), jnp.int32).at[jnp.arange(b)[:, None], top // s].add(hit.astype(jnp.int32))

  units_total = total // granularity
  raw = (counts.astype(jnp.float32) * (1.0 - alpha) + alpha * (total / kh)) / granularity
  avail_units = (jnp.maximum(available.astype(jnp.int32), 0) + granularity - 1) // granularity
  upper = jnp.minimum(jnp.minimum(units_total, cap // granularity), avail_units)
  floor = jnp.floor(raw)
  base = jnp.clip(floor.astype(jnp.int32), 0, upper)
  # sum(raw) <= units_total (counts sum to at most total), and floors and clamps only lower it: deficit >= 0.
  deficit = jnp.maximum(units_total - jnp.sum(base, axis=1), 0)
  remainder = raw - floor
  heads_by_remainder = jnp.argsort(-remainder, axis=1, stable=True)
  units = base + _level_fill(deficit, upper - base, heads_by_remainder)
  return (units * granularity).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class Budget:
  """Base of the budget rules. `keep` is the fraction of the S tokens a layer keeps on average, sinks and recent
  window included.

  `target`, when given, replaces `keep` by a byte target: the compression ratio against a dense bf16 cache that
  the held arrays must measure on the shape compress sees (S, layers, K, H, and the decode reserve), guard bands,
  scales, positions and page rounding included. compress solves the keep for that shape (akv_jax.ratios.
  resolve_target, once per shape) and raises, naming what is reachable, when no keep meets it within 3%.

  Class attributes:
    name: registry name (`Policy(budget=name)`).
    paged: heads of a layer keep different counts, so the body lives in a shared page pool.
    pooled_layers: the pool is shared by a group of layers whose split is decided per request (Adaptive).
  """

  name: ClassVar[str] = ""
  paged: ClassVar[bool] = False
  pooled_layers: ClassVar[bool] = False
  keep: float = 1.0
  target: float | None = dataclasses.field(default=None, kw_only=True)

  def __post_init__(self):
    if not 0.0 < self.keep <= 1.0:
      raise ValueError(f"keep={self.keep} must be in (0, 1]")
    if self.target is not None and not (isinstance(self.target, (int, float)) and self.target > 1.0):
      raise ValueError(f"target={self.target!r} must be a compression ratio > 1 (bf16 bytes over held bytes)")

  def layer_selected(self, avg: int, recent: int, layer: int, num_layers: int) -> int:
    """Selected tokens per head of `layer` when a layer keeps `avg` on average besides sinks and window."""
    del recent, layer, num_layers
    return avg


@dataclasses.dataclass(frozen=True)
class Uniform(Budget):
  """The same count in every layer and head."""

  name = "uniform"


@dataclasses.dataclass(frozen=True)
class Pyramid(Budget):
  """PyramidKV's funnel over layers (`pyramid_budgets`), `beta` its flatness."""

  name = "pyramid"
  beta: float = 20.0

  def __post_init__(self):
    super().__post_init__()
    if self.beta <= 0:
      raise ValueError(f"pyramid_beta={self.beta} must be > 0")

  def layer_selected(self, avg: int, recent: int, layer: int, num_layers: int) -> int:
    return pyramid_budgets(avg + recent, num_layers, window=recent, beta=self.beta)[layer]


@dataclasses.dataclass(frozen=True)
class AdaKV(Budget):
  """AdaKV: head-adaptive counts inside a layer (`adakv_head_budgets`), stored in a page pool so a layer holds
  the sum of its heads' budgets. `alpha` is the safeguard share of the uniform budget every head keeps, `cap`
  the most a head may keep as a multiple of the mean head budget (it sizes the page table)."""

  name = "adakv"
  paged = True
  alpha: float = 0.2
  cap: float = 3.0

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 <= self.alpha <= 1.0:
      raise ValueError(f"adakv_alpha={self.alpha} must be in [0, 1]")
    if self.cap < 1.0:
      raise ValueError(f"adakv_cap={self.cap} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Adaptive(AdaKV):
  """AdaKV generalised across layers, per request: the tokens of a group of layers (those stored alike) are split
  among all their (layer, kv head) pairs at once by the same rule (`adakv_head_budgets` over the pairs'
  scores), so each row of a batch spends its budget where its own prompt's attention is, and the group's bodies
  share one page pool (akv_jax.pooled). `alpha` and `cap` as in AdaKV, per (layer, head). Only
  `compress_layers` (and the models) can split across layers; a single layer's `compress` raises."""

  name = "adaptive"
  pooled_layers: ClassVar[bool] = True

  def per_layer(self) -> AdaKV:
    """The per-layer AdaKV rule of the same knobs, whose layers hold the same bytes (for byte accounting)."""
    return AdaKV(keep=self.keep, alpha=self.alpha, cap=self.cap, target=self.target)


BUDGETS: dict[str, type[Budget]] = {cls.name: cls for cls in (Uniform, Pyramid, AdaKV, Adaptive)}
