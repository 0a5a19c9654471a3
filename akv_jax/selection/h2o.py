"""H2O (Zhang et al., 2023): heavy hitters, the keys that accumulated the most attention over the prompt."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax

from akv_jax.cache import DenseKV
from akv_jax.selection import common
from akv_jax.selection.base import Needs, Observations, Scorer, register


@functools.partial(jax.jit, static_argnames=("chunk",))
def h2o_scores(queries: jax.Array, kv: DenseKV, *, query_positions: jax.Array | None = None,
               chunk: int = 256) -> jax.Array:
  """H2O heavy hitters: attention accumulated over many queries, averaged over the G heads of a kv head.

  Queries are processed `chunk` at a time under `lax.scan`, so peak memory is O(B * N * chunk * S) rather than
  the full [T, S] attention matrix (the prefill memory trap of algorithms.md).

  Args:
    queries: [B, N, T, H].
    kv: cache with k, v: [B, K, S, H].
    query_positions: i32[B, T] original position of each query; negative marks a padding query, which
      contributes nothing. Default: the positions of the last T valid slots of each head (lengths[b] - T + t
      when the cache recorded no positions). A right-padded prompt must pass -1 for its padding queries.
    chunk: queries per scan step (static, >= 1).

  Returns:
    f32[B, K, S]: sum over queries of the group-mean attention probability; -inf at padded slots.
  """
  b, kh, s, _ = common.check_kv(kv)
  q = common.group_queries(queries, kv, "queries")
  g, t = q.shape[2], q.shape[3]
  if chunk < 1:
    raise ValueError(f"chunk must be >= 1, got {chunk}")
  if query_positions is None:
    q_pos = common.last_positions(kv, t)
  else:
    if query_positions.shape != (b, t):
      raise ValueError(f"query_positions must be [B, T] = {(b, t)}, got shape {query_positions.shape}")
    q_pos = jnp.broadcast_to(query_positions.astype(jnp.int32)[:, None, :], (b, kh, t))

  c = min(chunk, t)
  n_chunks = -(-t // c)
  pad = n_chunks * c - t
  # Padding queries get position -1, which the attention mask turns into all-zero rows.
  q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, pad), (0, 0)))
  q_pos = jnp.pad(q_pos, ((0, 0), (0, 0), (0, pad)), constant_values=-1)
  q = jnp.moveaxis(q.reshape(b, kh, g, n_chunks, c, -1), 3, 0)  # [n_chunks, B, K, G, c, H]
  q_pos = jnp.moveaxis(q_pos.reshape(b, kh, n_chunks, c), 2, 0)  # [n_chunks, B, K, c]

  def step(acc, xs):
    q_c, pos_c = xs
    return acc + jnp.sum(common.gqa_softmax(q_c, kv, pos_c), axis=(2, 3)), None

  acc, _ = lax.scan(step, jnp.zeros((b, kh, s), jnp.float32), (q, q_pos))
  return common.mask_invalid(acc / g, kv)


@jax.jit
def h2o_scores_from_votes(votes: jax.Array, kv: DenseKV) -> jax.Array:
  """H2O scores from accumulated attention computed elsewhere (the prefill kernel's h2o_scores).

  Args:
    votes: f32[B, K, S] attention probability of each slot summed over all prefill queries and averaged over
      the G query heads of its kv head; padded slots may hold anything.
    kv: the cache the votes score; only its shape and lengths are read.

  Returns:
    f32[B, K, S] as `h2o_scores` over all prompt queries: the votes, -inf at padded slots.
  """
  common.check_votes(votes, kv)
  return common.mask_invalid(votes, kv)


@register
@dataclasses.dataclass(frozen=True)
class H2O(Scorer):
  """Attention accumulated over every prompt query (or the prefill kernel's votes); with the `HeavyHitter`
  decode rule the accumulation goes on while decoding and the weakest heavy hitter is evicted."""

  name = "h2o"
  decode_rule = "heavy_hitter"

  def needs(self, s: int) -> Needs:
    return Needs(queries=s, votes="all")

  def score(self, kv: DenseKV, obs: Observations) -> jax.Array:
    if obs.votes is not None:
      return h2o_scores_from_votes(obs.votes, kv)
    return h2o_scores(obs.queries, kv)
