"""SnapKV (Li et al., 2024): keys voted for by the observation window's attention, pooled along the sequence.

PyramidKV and AdaKV are SnapKV scores under other budget rules (akv_jax.selection.budgets).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax

from akv_jax.cache import DenseKV
from akv_jax.selection import common
from akv_jax.selection.base import Needs, Observations, Scorer, register

# "max" and "avg" pool over the valid slots (avg divides by the valid neighbours). "kvpress" is the average
# pooling of kvpress's SnapKVPress: torch avg_pool1d over the scores outside the observation window, zero padding
# counted (always divided by kernel_size), and the window slots scored at the row's maximum.
Pooling = Literal["max", "avg", "kvpress"]
POOLINGS = ("max", "avg", "kvpress")
Reduce = Literal["sum", "mean"]


def _check_snapkv(window: int, s: int, kernel_size: int, pooling: str, reduce: str) -> None:
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  if window > s:
    raise ValueError(f"window={window} exceeds the cache length S={s}")
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f"kernel_size must be odd and >= 1, got {kernel_size}")
  if pooling not in POOLINGS:
    raise ValueError(f"unknown pooling {pooling!r}, expected one of {POOLINGS}")
  if reduce not in ("sum", "mean"):
    raise ValueError(f"unknown reduce {reduce!r}, expected 'sum' or 'mean'")


def _snapkv_pool(votes: jax.Array, kv: DenseKV, window: int, kernel_size: int, pooling: str,
                 reduce: str) -> jax.Array:
  """The SnapKV steps after voting: mean over the window (if asked), pool along S, -inf at padding."""
  scores = votes.astype(jnp.float32)
  if reduce == "mean":
    scores = scores / window
  valid = kv.valid()
  if pooling == "kvpress":
    return common.mask_invalid(_kvpress_pool(scores, kv, window, kernel_size), kv)
  if kernel_size > 1:
    scores = common.pool(scores, valid, kernel_size, pooling)
  return common.mask_invalid(scores, kv)


def _kvpress_pool(scores: jax.Array, kv: DenseKV, window: int, kernel_size: int) -> jax.Array:
  """kvpress's pooling of f32[B, K, S]: the window's W slots and the padding read as zeros, the sum over each
  kernel divided by kernel_size; then the window slots get the row's maximum (kvpress pads them with it)."""
  slot = jnp.arange(scores.shape[2])[None, None, :]
  before = slot < kv.head_lengths()[:, :, None] - window           # valid and outside the window
  x = jnp.where(before, scores, 0.0)
  pad = kernel_size // 2
  total = lax.reduce_window(x, 0.0, lax.add, (1, 1, kernel_size), (1, 1, 1), ((0, 0), (0, 0), (pad, pad)))
  pooled = jnp.where(before, total / kernel_size, -jnp.inf)
  top = jnp.max(pooled, axis=(1, 2), keepdims=True)   # kvpress's scores.max() over every head of the row
  return jnp.where(before, pooled, top)


@functools.partial(jax.jit, static_argnames=("window", "kernel_size", "pooling", "reduce"))
def snapkv_scores(q_obs: jax.Array, kv: DenseKV, *, window: int = 32, kernel_size: int = 7,
                  pooling: Pooling = "max", reduce: Reduce = "mean") -> jax.Array:
  """SnapKV: attention from the observation window, combined over the group, then pooled along S.

  Row b's window query w is the token in slot `head_lengths[b, k] - W + w` (the last W valid tokens; with a
  per-row lengths i32[B] every head agrees). A row shorter than W has leading window queries in negative
  slots; they contribute nothing, and "mean" still divides by W so that sum and mean differ by exactly W.

  Order of operations: sum over the W queries, mean over the G query heads (the "votes", which
  `snapkv_scores_from_votes` accepts from a kernel that computed them), then reduce and pool. Pooling after
  the group mean (kvpress pools each query head first) keeps one pooled score per kv head; for max pooling the
  two orders differ.

  Args:
    q_obs: [B, N, W, H] queries of the last W tokens of each row.
    kv: cache with k, v: [B, K, S, H]; lengths i32[B] or i32[B, K].
    window: W, must equal q_obs.shape[2] and be at most S (static).
    kernel_size: odd pooling width (static); 1 disables pooling.
    pooling: "max" (LongBench configs) or "avg" (divides by the number of valid neighbours).
    reduce: "sum" over the window queries (paper) or "mean" (kvpress).

  Returns:
    f32[B, K, S], -inf at padded slots. Window tokens are scored like any other token.
  """
  _, _, s, _ = common.check_kv(kv)
  q = common.group_queries(q_obs, kv, "q_obs")
  w = q.shape[3]
  if window >= 1 and w != window:
    raise ValueError(f"window={window} differs from q_obs window length {w} (q_obs shape {q_obs.shape})")
  _check_snapkv(window, s, kernel_size, pooling, reduce)
  probs = common.gqa_softmax(q, kv, common.last_positions(kv, w))  # [B, K, G, W, S]
  votes = jnp.mean(jnp.sum(probs, axis=3), axis=2)
  return _snapkv_pool(votes, kv, window, kernel_size, pooling, reduce)


@functools.partial(jax.jit, static_argnames=("window", "kernel_size", "pooling", "reduce"))
def snapkv_scores_from_votes(votes: jax.Array, kv: DenseKV, *, window: int = 32, kernel_size: int = 7,
                             pooling: Pooling = "max", reduce: Reduce = "mean") -> jax.Array:
  """SnapKV scores from window votes computed elsewhere, e.g. by the prefill kernel in the same pass as attention.

  Equal to `snapkv_scores(q_obs, kv, ...)` when votes[b, k, s] is the attention probability of slot s summed
  over the last `window` valid queries and averaged over the G query heads of kv head k (the window_scores
  of pallas_kernels.prefill_scores.prefill_attention).

  Args:
    votes: f32[B, K, S] summed window attention; padded slots may hold anything.
    kv: the cache the votes score; only its shape, lengths and positions are read.
    window, kernel_size, pooling, reduce: as in `snapkv_scores` (static).

  Returns:
    f32[B, K, S], -inf at padded slots.
  """
  _, _, s, _ = common.check_kv(kv)
  common.check_votes(votes, kv)
  _check_snapkv(window, s, kernel_size, pooling, reduce)
  return _snapkv_pool(votes, kv, window, kernel_size, pooling, reduce)


@register
@dataclasses.dataclass(frozen=True)
class SnapKV(Scorer):
  """SnapKV scores from the last `window` prompt queries (or the prefill kernel's window votes).

  Attributes:
    window: W, the observation window; it must fit in the policy's bf16 recent window.
    kernel_size, pooling, reduce: as in `snapkv_scores`.
  """

  name = "snapkv"
  window: int = 32
  kernel_size: int = 7
  pooling: Pooling = "max"
  reduce: Reduce = "mean"

  def __post_init__(self):
    if self.window < 1:
      raise ValueError(f"window={self.window} must be >= 1 for selection='snapkv'")
    if self.kernel_size < 1 or self.kernel_size % 2 == 0:
      raise ValueError(f"kernel_size={self.kernel_size} must be odd and >= 1")
    if self.pooling not in POOLINGS:
      raise ValueError(f"pooling={self.pooling!r} must be one of {POOLINGS}")
    if self.reduce not in ("mean", "sum"):
      raise ValueError(f"reduce={self.reduce!r} must be 'mean' or 'sum'")

  def needs(self, s: int) -> Needs:
    return Needs(queries=self.window, votes="window")

  def check(self, *, recent: int) -> None:
    if self.window > recent:
      raise ValueError(f"window={self.window} must not exceed recent={recent}: the observation window is kept "
                       "in the bf16 recent window")

  def check_length(self, s: int) -> None:
    if self.window > s:
      raise ValueError(f"window={self.window} is longer than the sequence S={s}")

  def check_observations(self, obs: Observations, b: int, kh: int, h: int, s: int) -> None:
    super().check_observations(obs, b, kh, h, s)
    if obs.votes is None and obs.queries.shape[2] < self.window:
      raise ValueError(f"queries hold {obs.queries.shape[2]} tokens, fewer than window={self.window}")

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    knobs = dict(window=self.window, kernel_size=self.kernel_size, pooling=self.pooling, reduce=self.reduce)
    if obs.votes is not None:
      return snapkv_scores_from_votes(obs.votes, kv, **knobs)
    return snapkv_scores(obs.queries[:, :, -self.window:], kv, **knobs)
