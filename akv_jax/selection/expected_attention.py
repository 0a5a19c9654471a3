"""Expected Attention (Devoto et al., 2025; kvpress's ExpectedAttentionPress): keys ranked by the attention that
future queries are expected to pay them, from a Gaussian model of the prompt's queries.

Question-agnostic: the score depends on the prompt's query statistics, not on any particular query, so a context
compressed before its question is seen keeps what later queries will look at on average.

Per kv head k and query head n of its group, with the prompt's pre-RoPE queries after the sinks:
  1. mu_n, Sigma_n: their mean and (biased) covariance over positions;
  2. R: the rotary rotation averaged over the next `future` positions p = L .. L + future - 1 (L the row's prompt
     length), so mu' = R mu and Sigma' = R Sigma R^T;
  3. logit(key) = key . mu' / sqrt(H) + key^T Sigma' key / (2 H): the log of E[exp(q . key / sqrt(H))] for a
     Gaussian q, softmax over the row's valid non-sink keys, mean over the G heads of the group;
  4. times ||value||_2 (plus `epsilon`) when `value_norm`; sinks score highest.

Pre-RoPE queries are recovered from the post-RoPE ones the model passes, by rotating each back by its position
(exact up to rounding). The model's rotary frequencies arrive through `Observations.inv_freq`; nothing here
imports the model.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from akv_jax.cache import DenseKV
from akv_jax.selection import common
from akv_jax.selection.base import Needs, Observations, Scorer, register
from akv_jax.softmax import masked_softmax


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Half-split rotary rotation of x [..., H] by angles with cos, sin [..., H / 2] (negate sin to undo it)."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _mean_rotation(lengths: jax.Array, inv_freq: jax.Array, future: int) -> tuple[jax.Array, jax.Array]:
  """Mean cos and sin of p * inv_freq over p = L .. L + future - 1: f32[B, H / 2] each (L = lengths[b])."""
  p = lengths[:, None].astype(jnp.float32) + jnp.arange(future, dtype=jnp.float32)[None, :]   # [B, F]
  angles = p[:, :, None] * inv_freq[None, None, :]                                           # [B, F, H/2]
  return jnp.mean(jnp.cos(angles), axis=1), jnp.mean(jnp.sin(angles), axis=1)


@functools.partial(jax.jit, static_argnames=("future", "n_sink", "covariance", "value_norm", "epsilon"))
def expected_attention_scores(queries: jax.Array, kv: DenseKV, inv_freq: jax.Array, *, future: int = 512,
                              n_sink: int = 4, covariance: bool = True, value_norm: bool = True,
                              epsilon: float = 0.0) -> jax.Array:
  """Expected Attention scores of a prefill cache.

  Args:
    queries: [B, N, T, H] post-RoPE queries of the last T prompt tokens of each row (T = S: the whole prompt;
      row b's query t sits at position L_b - T + t with L_b = lengths[b]). Queries before position n_sink or
      before position 0 are left out of the statistics.
    kv: the prefill cache, k, v [B, K, S, H] with per-row lengths i32[B]; keys post-RoPE.
    inv_freq: f32[H / 2] the model's rotary inverse frequencies.
    future: number of future positions the rotation is averaged over (static, >= 1).
    n_sink: leading tokens excluded from the statistics and always kept (static, >= 0).
    covariance: include the covariance term (static).
    value_norm: multiply by each value's L2 norm plus epsilon (static).

  Returns:
    f32[B, K, S]: SINK_SCORE at sinks, the expected attention elsewhere, -inf at padding.
  """
  b, kh, s, h = common.check_kv(kv)
  if future < 1:
    raise ValueError(f"future={future} must be >= 1")
  if n_sink < 0:
    raise ValueError(f"n_sink={n_sink} must be >= 0")
  if inv_freq.shape != (h // 2,):
    raise ValueError(f"inv_freq must be [H / 2] = {(h // 2,)}, got shape {inv_freq.shape}")
  q = common.group_queries(queries, kv, "queries")                         # f32[B, K, G, T, H]
  t = q.shape[3]
  lengths = kv.head_lengths()[:, 0]                                        # i32[B]
  pos = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None, :]     # [B, T]
  inv = inv_freq.astype(jnp.float32)
  angles = pos.astype(jnp.float32)[..., None] * inv                        # [B, T, H/2]
  cos, sin = jnp.cos(angles)[:, None, None], jnp.sin(angles)[:, None, None]
  pre = _rotate(q, cos, -sin)                                              # undo RoPE: pre-RoPE queries
  used = (pos >= n_sink)[:, None, None, :, None]                           # [B, 1, 1, T, 1]
  count = jnp.maximum(jnp.sum(used, axis=3), 1).astype(jnp.float32)       # [B, 1, 1, 1]
  mu_pre = jnp.sum(jnp.where(used, pre, 0.0), axis=3) / count              # [B, K, G, H]
  c_bar, s_bar = _mean_rotation(lengths, inv, future)                      # [B, H/2]
  c_bar, s_bar = c_bar[:, None, None], s_bar[:, None, None]
  mu = _rotate(mu_pre, c_bar, s_bar)
  k = kv.k.astype(jnp.float32)
  hp = lax.Precision.HIGHEST
  logits = jnp.einsum("BKGH,BKSH->BKGS", mu, k, precision=hp) / math.sqrt(h)
  if covariance:
    d = jnp.where(used, pre - mu_pre[:, :, :, None, :], 0.0)
    sigma = jnp.einsum("BKGTI,BKGTJ->BKGIJ", d, d, precision=hp) / count[..., None]
    # R Sigma R^T with R the averaged rotation (not orthogonal: averaging shrinks it): rotating the rows of
    # Sigma gives Sigma R^T; its transpose is R Sigma (Sigma is symmetric); rotating those rows gives R Sigma R^T.
    sigma = _rotate(jnp.swapaxes(_rotate(sigma, c_bar[..., None, :], s_bar[..., None, :]), -1, -2),
                    c_bar[..., None, :], s_bar[..., None, :])
    logits = logits + jnp.einsum("BKSI,BKGIJ,BKSJ->BKGS", k, sigma, k, precision=hp) / (2 * h)
  key_pos = kv.token_positions()
  candidate = kv.valid() & (key_pos >= n_sink)                            # [B, K, S]
  scores = jnp.mean(masked_softmax(logits, candidate[:, :, None]), axis=2)                                         # [B, K, S]
  if value_norm:
    scores = (scores + epsilon) * jnp.linalg.norm(kv.v.astype(jnp.float32), axis=-1)
  scores = jnp.where(key_pos < n_sink, common.SINK_SCORE, scores)
  return common.mask_invalid(scores, kv)


@register
@dataclasses.dataclass(frozen=True)
class ExpectedAttention(Scorer):
  """Expected Attention over every prompt query (kvpress defaults: 512 future positions, 4 sinks, covariance
  and value-norm rescaling on).

  Attributes:
    future: positions after the prompt the rotary rotation is averaged over.
    n_sink: leading tokens left out of the query statistics (the policy's sinks are kept in any case).
    covariance, value_norm, epsilon: as in `expected_attention_scores`.
  """

  name = "expected_attention"
  future: int = 512
  n_sink: int = 4
  covariance: bool = True
  value_norm: bool = True
  epsilon: float = 0.0

  def __post_init__(self):
    if self.future < 1:
      raise ValueError(f"future={self.future} must be >= 1")
    if self.n_sink < 0:
      raise ValueError(f"n_sink={self.n_sink} must be >= 0")
    if self.epsilon < 0:
      raise ValueError(f"epsilon={self.epsilon} must be >= 0")

  def needs(self, s: int) -> Needs:
    return Needs(queries=s, rope=True)

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    return expected_attention_scores(obs.queries, kv, obs.inv_freq, future=self.future, n_sink=self.n_sink,
                                     covariance=self.covariance, value_norm=self.value_norm, epsilon=self.epsilon)
