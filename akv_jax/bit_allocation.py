"""Per-layer bits chosen from measured sensitivity, under a byte budget.

Layers differ in how much quantization costs them: on SmolLM2 a few layers lose the needle at 2 bits while most
do not notice. A uniform width spends bytes where they buy nothing. This module measures, for each layer and each
candidate width, the attention-output error of the layer's observation queries (the prompt's last W queries, the
same SnapKV reads) over the cache compressed at that width, against the dense cache, and the bytes that cache
holds; then spends a byte budget where it lowers the error most.

    plan = akv.bit_allocation.plan_bits(policy, kvs, queries, target=6.0)   # kvs: one DenseKV per layer
    policy = plan.policy                                                    # layer_bits = plan.widths
    plan.to_dict()                                                          # widths, errors, bytes, ratio

The allocation is greedy by marginal utility: every layer starts at its cheapest candidate; each step moves the
one layer whose next candidate removes the most error per extra byte (over all of its wider candidates, so a
width that is dearer but no better is never taken) while the budget allows, until no move fits. The objective is
the sum over layers of the relative output errors, a proxy: errors of different layers compound through the
model in ways one layer's measurement does not see. A width is applied to a whole layer (keys and values both,
every kv head: `Policy.layer_bits`), so the plan is static, and a model compiles once for it.

The observation queries are treated as decode queries that see every prompt token (they saw all but the last few
when the prompt ran): the proxy SnapKV itself rests on. Bytes are those of the arrays compress returns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from akv_jax.attention import attend, dense_attention
from akv_jax.cache import DenseKV, dense_bf16_bytes, nbytes
from akv_jax.pipeline import compress
from akv_jax.policy import Policy
from akv_jax.quant import SUPPORTED_BITS

# Default candidates: the packed widths (add None for bf16 layers).
WIDTHS: tuple[int | None, ...] = (2, 4, 8)


@jax.jit
def output_error(kv: DenseKV, ckv, queries: jax.Array) -> jax.Array:
  """Relative error (f32 scalar) of the attention outputs of queries [B, N, T, H], each attending every prompt
  token, over the compressed cache ckv against the dense cache kv it came from: ||out_c - out|| / ||out||."""
  def one(q):   # q: [B, N, H]
    return attend(q, ckv).astype(jnp.float32), dense_attention(q, kv.k, kv.v, kv.lengths).astype(jnp.float32)
  approx, exact = jax.vmap(one, in_axes=2)(queries)
  return jnp.linalg.norm(approx - exact) / jnp.maximum(jnp.linalg.norm(exact), 1e-30)


@dataclasses.dataclass(frozen=True, eq=False)
class BitPlan:
  """A per-layer width choice and the measurements it was made from.

  Attributes:
    policy: the input policy with layer_bits = widths.
    widths: the width of each layer (None: bf16).
    candidates: the widths that were measured, in the order of the columns below.
    errors: f64[L, W] output error of each layer at each candidate.
    layer_bytes: i64[L, W] bytes each layer's cache holds at each candidate.
    budget_bytes: the bytes allowed (dense bf16 bytes / target).
    dense_bf16_bytes: bytes of the dense bf16 cache of every layer.
  """

  policy: Policy
  widths: tuple[int | None, ...]
  candidates: tuple[int | None, ...]
  errors: np.ndarray
  layer_bytes: np.ndarray
  budget_bytes: int
  dense_bf16_bytes: int

  @property
  def _columns(self) -> list[int]:
    """The candidate column each layer's width is."""
    return [self.candidates.index(w) for w in self.widths]

  @property
  def held_bytes(self) -> int:
    return int(sum(self.layer_bytes[i, c] for i, c in enumerate(self._columns)))

  @property
  def ratio(self) -> float:
    return self.dense_bf16_bytes / self.held_bytes

  def to_dict(self) -> dict:
    return dict(widths=list(self.widths), candidates=list(self.candidates), ratio=round(self.ratio, 4),
                held_bytes=self.held_bytes, budget_bytes=self.budget_bytes,
                dense_bf16_bytes=self.dense_bf16_bytes,
                error_sum=float(sum(self.errors[i, c] for i, c in enumerate(self._columns))),
                errors=np.round(self.errors, 6).tolist(), layer_bytes=self.layer_bytes.tolist())


def _check_widths(widths: Sequence[int | None]) -> tuple[int | None, ...]:
  widths = tuple(widths)
  if not widths:
    raise ValueError("widths is empty: give at least one candidate width")
  for w in widths:
    if w is not None and w not in SUPPORTED_BITS:
      raise ValueError(f"width {w!r} is not supported; use widths from {SUPPORTED_BITS} or None for bf16")
  if len(set(widths)) != len(widths):
    raise ValueError(f"widths={list(widths)} names a width more than once")
  return widths


def measure(policy: Policy, kvs: Sequence[DenseKV], queries: Sequence[jax.Array], *,
            widths: Sequence[int | None] = WIDTHS, reserve: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """(errors f64[L, W], bytes i64[L, W]): each layer compressed by the policy's recipe with every layer at each
  candidate width. kvs: one DenseKV [B, K, S, H] per layer; queries: one [B, N, T, H] per layer (the
  observation queries its scorer reads, which are also the probe)."""
  widths = _check_widths(widths)
  if len(kvs) != len(queries):
    raise ValueError(f"got {len(kvs)} layers of kv and {len(queries)} of queries")
  if policy.budget.target is not None:
    raise ValueError(f"policy {policy.name!r} has target={policy.budget.target}x: fix its keep first "
                     "(policy.with_keep or akv.ratios.resolve_target), then choose its bits")
  num_layers = len(kvs)
  errors = np.zeros((num_layers, len(widths)))
  held = np.zeros((num_layers, len(widths)), np.int64)
  for j, w in enumerate(widths):
    pol = dataclasses.replace(policy, layer_bits=(w,) * num_layers)
    for layer, (kv, q) in enumerate(zip(kvs, queries)):
      ckv = compress(kv, pol, queries=q, layer=layer, num_layers=num_layers, reserve=reserve)
      errors[layer, j] = float(output_error(kv, ckv, q))
      held[layer, j] = nbytes(ckv)
  return errors, held


def allocate(errors: np.ndarray, costs: np.ndarray, budget: int) -> list[int]:
  """Column index per row of errors/costs [L, W] whose cost sum is at most budget: greedy by marginal utility
  (module docstring).

  Raises:
    ValueError: even the cheapest column of every row costs more than budget, naming both.
  """
  errors, costs = np.asarray(errors, np.float64), np.asarray(costs, np.int64)
  if errors.shape != costs.shape or errors.ndim != 2:
    raise ValueError(f"errors {errors.shape} and costs {costs.shape} must both be [L, W]")
  pick = [int(np.lexsort((errors[i], costs[i]))[0]) for i in range(len(costs))]   # cheapest, then best
  spent = int(sum(costs[i, c] for i, c in enumerate(pick)))
  if spent > budget:
    raise ValueError(f"a budget of {budget} bytes is below the {spent} bytes the narrowest widths hold")
  while True:
    best = None   # (utility, layer, column)
    for i, c in enumerate(pick):
      for j in range(costs.shape[1]):
        extra, gain = costs[i, j] - costs[i, c], errors[i, c] - errors[i, j]
        if gain <= 0 or spent + max(extra, 0) > budget:
          continue
        utility = np.inf if extra <= 0 else gain / extra
        if best is None or utility > best[0]:
          best = (utility, i, j)
    if best is None:
      return pick
    _, i, j = best
    spent += int(costs[i, j] - costs[i, pick[i]])
    pick[i] = j


def plan_bits(policy: Policy, kvs: Sequence[DenseKV], queries: Sequence[jax.Array], *, target: float,
              widths: Sequence[int | None] = WIDTHS, reserve: int = 0) -> BitPlan:
  """Chooses each layer's width so the whole cache measures at least `target` x against dense bf16 and the sum
  of the layers' output errors is as low as the greedy allocation finds.

  The policy's recipe (selection, keep, groups, guard bands) stays; its layer_bits are replaced, which also
  replaces its guard layers' bits: the measurement decides which layers need more.

  Raises:
    ValueError: target <= 1; widths outside the supported set; a policy with a byte target of its own; or a
      target even the narrowest widths cannot reach, naming the ratio they reach.
  """
  if not target > 1:
    raise ValueError(f"target={target!r} must be a compression ratio > 1")
  widths = _check_widths(widths)
  errors, held = measure(policy, kvs, queries, widths=widths, reserve=reserve)
  dense = sum(dense_bf16_bytes(kv) for kv in kvs)
  budget = int(dense // target)
  try:
    pick = allocate(errors, held, budget)
  except ValueError:
    floor = int(held.min(axis=1).sum())
    raise ValueError(f"target={target}x cannot be met with widths {list(widths)}: the narrowest hold {floor} "
                     f"bytes ({dense / floor:.2f}x); a target up to {dense / floor:.2f}x, narrower widths or a "
                     "smaller keep would meet it") from None
  chosen = tuple(widths[c] for c in pick)
  return BitPlan(policy=dataclasses.replace(policy, layer_bits=chosen), widths=chosen, candidates=widths,
                 errors=errors, layer_bytes=held, budget_bytes=budget, dense_bf16_bytes=dense)
