"""Measured compression ratios of a policy on a model's cache shape, and a policy's keep fitted to a target ratio.

A preset's name promises a ratio (hybrid_8x: 8x), but what a policy holds depends on the model: the bf16 sinks and
recent window, the scales of every quantization group and the page rounding cost the same per head whatever S,
and weigh more on a small head dim or a short context. So a name calibrated on one shape (presets.py: H = 128,
32 layers, S >= 8k) does not hold on another (SmolLM2: H = 64, 30 layers, S = 4k gives hybrid_8x 6.6x).
`fit_keep` keeps the policy's recipe (selection, budget rule, bits, guard bands) and solves for the keep fraction
whose held bytes give the target ratio on the given shape.

Bytes are those of the arrays compress returns: storage is static-shaped, so `jax.eval_shape` of compress gives
exactly the arrays a real run holds (tests/library/test_presets.py checks this against materialized caches).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from akv_jax.cache import DenseKV, nbytes
from akv_jax.pipeline import compress
from akv_jax.policy import Policy


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheShape:
  """The shape of one model's KV cache at one context length: what a compression ratio is measured on."""

  s: int                 # S, tokens per row
  num_layers: int
  kv_heads: int          # K
  head_dim: int          # H
  q_heads: int | None = None   # N (default K): observation queries, shape only
  batch: int = 1

  def __post_init__(self):
    for field in ("s", "num_layers", "kv_heads", "head_dim", "batch"):
      if getattr(self, field) < 1:
        raise ValueError(f"{field}={getattr(self, field)} must be >= 1")

  def dense_bf16_bytes(self) -> int:
    return 2 * 2 * self.batch * self.num_layers * self.kv_heads * self.s * self.head_dim


def held_bytes(policy: Policy, shape: CacheShape, *, reserve: int = 0, window: int = 32) -> int:
  """Bytes every layer's compressed prefill cache holds for bf16 K/V of `shape` (reserve: decode room).

  A budget split across layers (Adaptive) holds what its per-layer AdaKV rule holds: a group's pool is the sum
  of its layers' pools, and each layer keeps the same page table (tests/library/test_pooled.py)."""
  if policy.budget.pooled_layers:
    policy = dataclasses.replace(policy, budget=policy.budget.per_layer())
  b, kh, s, h = shape.batch, shape.kv_heads, shape.s, shape.head_dim
  kv = DenseKV(k=jax.ShapeDtypeStruct((b, kh, s, h), jnp.bfloat16), v=jax.ShapeDtypeStruct((b, kh, s, h), jnp.bfloat16),
               lengths=jax.ShapeDtypeStruct((b,), jnp.int32))
  needs = policy.needs(s)
  t = min(max(window, needs.queries), s)
  q = jax.ShapeDtypeStruct((b, shape.q_heads or kh, t, h), jnp.bfloat16)
  obs = {}
  if needs.queries:
    obs["queries"] = q
  elif needs.reconstruction is not None:   # votes of a model pass (KVzip): only their shape matters here
    obs["votes"] = jax.ShapeDtypeStruct((b, kh, s), jnp.float32)
  if needs.rope:
    obs["inv_freq"] = jax.ShapeDtypeStruct((h // 2,), jnp.float32)
  return sum(nbytes(jax.eval_shape(
      lambda kv, obs, layer=layer: compress(kv, policy, layer=layer, num_layers=shape.num_layers,
                                            reserve=reserve, **obs), kv, obs))
             for layer in range(shape.num_layers))


def measured_ratio(policy: Policy, shape: CacheShape, *, reserve: int = 0) -> float:
  """Dense bf16 bytes of `shape` over the bytes the policy's cache holds (with room for `reserve` decode tokens)."""
  return shape.dense_bf16_bytes() / held_bytes(policy, shape, reserve=reserve)


def _smallest_keep(policy: Policy, s: int) -> float:
  """The least keep whose budget still covers the sinks and the recent window (Policy.layout's floor)."""
  recency_only = policy.scorer is not None and policy.scorer.recency_only
  floor = policy.n_sink + policy.recent_tokens(s) + (1 if recency_only else 0)
  if policy.budget.paged:   # a page pool needs at least one page of selected tokens
    keys = policy.keys
    flush = keys.group if keys is not None and keys.axis == "channel" else 1
    floor += flush * -(-16 // flush)
  return min(1.0, max(floor, 1) / s)


def fit_keep(policy: Policy, target: float, shape: CacheShape, *, tol: float = 0.005,
             iterations: int = 30, reserve: int = 0) -> Policy:
  """The policy with the keep fraction whose measured ratio on `shape` is `target` (within tol, relatively).

  The ratio falls as keep grows, in steps (budgets are whole tokens, rounded to key groups and pages), so this
  bisects keep until the measured ratio is in [target, target * (1 + tol)] (or the steps allow no closer): the
  fitted policy never holds more than the target allows. The name is kept: the fitted policy is the named recipe
  at its named ratio.

  Raises:
    ValueError: the policy selects nothing (no keep to fit), or no keep reaches the target (the guard bands and
      bits alone hold more than target allows), naming the ratio it can reach.
  """
  if policy.scorer is None:
    raise ValueError(f"policy {policy.name!r} keeps every token, so keep cannot be fitted; its ratio on this "
                     f"shape is {measured_ratio(policy, shape, reserve=reserve):.2f}x")
  if target <= 0:
    raise ValueError(f"target={target} must be > 0")
  ratio = lambda keep: measured_ratio(policy.with_keep(keep), shape, reserve=reserve)  # noqa: E731
  lo = _smallest_keep(policy, shape.s)
  best = ratio(lo)
  if best < target * (1 - tol):
    raise ValueError(f"policy {policy.name!r} reaches at most {best:.2f}x on {shape} (keep={lo:.4f}), short of "
                     f"the target {target}x: its guard bands and bits hold too much for this shape; a target up "
                     f"to {best:.2f}x, a smaller recent window or fewer bits would meet it")
  if best <= target * (1 + tol):
    return policy.with_keep(lo)
  hi = 1.0
  if ratio(hi) >= target:
    return policy.with_keep(hi)
  # Invariant: ratio(lo) >= target > ratio(hi). Stop once ratio(lo) is within tol above the target.
  for _ in range(iterations):
    mid = math.floor((lo + hi) / 2 * 1e6) / 1e6
    if mid in (lo, hi):
      break
    r = ratio(mid)
    if r >= target:
      lo = mid
      if r <= target * (1 + tol):
        break
    else:
      hi = mid
  return policy.with_keep(lo)


# How far a resolved target may land from the ratio asked for: budgets move in whole tokens, key groups and pages.
TARGET_TOLERANCE = 0.03


@functools.lru_cache(maxsize=512)
def resolve_target(policy: Policy, shape: CacheShape, *, reserve: int = 0) -> Policy:
  """The policy with its budget's byte target replaced by the keep that meets it on `shape` with room for
  `reserve` decode tokens: the held arrays measure within TARGET_TOLERANCE of the target (from above where the
  steps allow). Cached per (policy, shape, reserve), so compress solves once per model shape, not per layer.

  Raises:
    ValueError: no keep meets the target within the tolerance (guard bands alone hold more, or even keeping
      every token holds less), naming the ratio the recipe reaches.
  """
  target = policy.budget.target
  if target is None:
    return policy
  recipe = policy.with_target(None)
  fitted = fit_keep(recipe, target, shape, reserve=reserve)
  got = measured_ratio(fitted, shape, reserve=reserve)
  if abs(got / target - 1) > TARGET_TOLERANCE:
    what = ("keeping every token already holds less" if fitted.budget.keep >= 1.0 else
            "the budget steps (tokens, key groups, pages) allow no closer")
    raise ValueError(f"policy {policy.name!r} cannot meet target={target}x on {shape} (reserve {reserve}): it "
                     f"measures {got:.2f}x at keep={fitted.budget.keep:.4f} ({what}); a target within "
                     f"{TARGET_TOLERANCE:.0%} of {got:.2f}x would be met")
  return fitted
