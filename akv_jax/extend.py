"""Multi-token extend of a compressed cache: T new tokens attend over it, then enter it by the decode rule.

This is how a question is prefilled on top of a context that was compressed before the question was seen
(question-agnostic compression, kvpress's default setting): token t of the chunk attends to every slot the cache
holds and causally to chunk tokens 0..t, all in one softmax, and the chunk's tokens are then appended one by one
with `akv.append`'s rule (KIVI's residual flush, StreamingLLM and H2O eviction), so the cache afterwards is exactly
the cache of T single appends.

Attention is computed before any of the chunk is appended: every chunk token sees the cache as it was when the
chunk arrived (nothing the chunk itself would evict or quantize is lost to it). With the full policy this is
plain causal attention over the context and the chunk.

H2O: the chunk's attention to the old slots is added to their accumulated scores before the chunk is appended,
and each chunk token enters with the attention it received from the chunk (its own query and the later ones);
eviction decisions during the appends see those scores.

Rows may extend by different numbers of tokens: `counts` i32[B] says how many of the T are real; a row's tokens
from counts[b] on are neither attended to nor appended, and their outputs are zero.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from akv_jax import dispatch, validation
from akv_jax import rotation as _rotation
from akv_jax.attention import cache_slots
from akv_jax.cache import CompressedKV
from akv_jax.decode import _append, check_state
from akv_jax.policy import Policy
from akv_jax.softmax import masked_softmax


def _check(q, k, v, ckv: CompressedKV, counts) -> tuple[int, int, int, int, int]:
  b, kh, h = validation.compressed(ckv)
  validation.queries(q, b, kh, h, name="q", ranks=(4,))
  n, t = q.shape[1], q.shape[2]
  for name, x in (("k", k), ("v", v)):
    if x.shape != (b, kh, t, h):
      raise ValueError(f"{name} must be [B, K, T, H] = {(b, kh, t, h)} to match q {q.shape} and the cache, "
                       f"got shape {x.shape}")
  if counts is not None and jnp.shape(counts) != (b,):
    raise ValueError(f"counts shape {jnp.shape(counts)} must be ({b},)")
  return b, kh, n, t, h


def _attention(q, k, v, ckv: CompressedKV, counts, scale: float):
  """Chunk attention: (out [B, N, T, H] in q's dtype, old-slot probs f32[B, K, C], chunk probs f32[B, K, T]).

  The probabilities are each slot's attention summed over the chunk's real queries and averaged over the G query
  heads of its kv head (what H2O accumulates).
  """
  b, kh, n, t, h = q.shape[0], ckv.num_kv_heads, q.shape[1], q.shape[2], q.shape[3]
  g = n // kh
  keys, values, _, valid = cache_slots(ckv)                     # every valid slot precedes the chunk
  qg = (q.astype(jnp.float32) * scale).reshape(b, kh, g, t, h)
  s_old = jnp.einsum("BKGTH,BKCH->BKGTC", qg, keys)
  s_new = jnp.einsum("BKGTH,BKSH->BKGTS", qg, k.astype(jnp.float32))
  tq = jnp.arange(t)
  real = tq[None, :] < counts[:, None]                          # [B, T]
  causal = (tq[None, :] <= tq[:, None])[None] & real[:, None, :]          # [B, T(query), T(key)]
  old_vis = jnp.broadcast_to(valid[:, :, None, None, :], s_old.shape)
  new_vis = jnp.broadcast_to(causal[:, None, None], s_new.shape)
  p = masked_softmax(jnp.concatenate([s_old, s_new], axis=-1), jnp.concatenate([old_vis, new_vis], axis=-1))
  p = jnp.where(real[:, None, None, :, None], p, 0.0)            # padded queries count for nothing
  c = keys.shape[2]
  out = (jnp.einsum("BKGTC,BKCH->BKGTH", p[..., :c], values)
         + jnp.einsum("BKGTS,BKSH->BKGTH", p[..., c:], v.astype(jnp.float32)))
  received = jnp.sum(jnp.mean(p, axis=2), axis=2)               # [B, K, C + T]
  return out.reshape(b, n, t, h).astype(q.dtype), received[..., :c], received[..., c:]


def _extend(q, k, v, ckv: CompressedKV, policy: Policy, counts, scale, implementation, interpret):
  dispatch.check(implementation, interpret)
  b, _, _, t, h = _check(q, k, v, ckv, counts)
  counts = jnp.full((b,), t, jnp.int32) if counts is None else jnp.asarray(counts, jnp.int32)
  scale = 1.0 / math.sqrt(h) if scale is None else scale
  rot = ckv.rotation
  if rot is None:
    out, old_probs, new_probs = _attention(q, k, v, ckv, counts, scale)
  else:
    # Rotated storage: the chunk attends in the cache's basis, its tokens as append will store them, and the
    # output comes back once; append rotates the tokens itself, so the scan below gets them as given.
    out, old_probs, new_probs = _attention(
        _rotation.rotate_queries(q, rot[:, :, 0]), _rotation.rotate(k, rot[:, :, 0]).astype(k.dtype),
        _rotation.rotate(v, rot[:, :, 1]).astype(v.dtype), ckv, counts, scale)
    out = _rotation.unrotate_output(out, rot[:, :, 1]).astype(q.dtype)
  check_state(ckv, policy)
  # The rule sees the chunk's attention to the body and recent slots (sinks are never evicted, so it gets none
  # of theirs), and each new token's from the later tokens of its chunk as it is appended.
  ckv = dataclasses.replace(ckv, state=policy.decode.observe(ckv.state, old_probs[..., ckv.sink_k.shape[2]:]))

  def step(c, xs):
    k_t, v_t, score, i = xs
    # Rows past their count take no token: append leaves them as they are (no copy of the cache per step).
    return _append(c, k_t, v_t, policy, implementation, interpret, score=score, rows=i < counts), None

  xs = (jnp.moveaxis(k, 2, 0), jnp.moveaxis(v, 2, 0), jnp.moveaxis(new_probs, 2, 0), jnp.arange(t))
  ckv, _ = jax.lax.scan(step, ckv, xs)
  return out, ckv


@functools.partial(jax.jit, static_argnames=("policy", "scale", "implementation", "interpret"),
                   donate_argnames=("ckv",))
def extend(q: jax.Array, k: jax.Array, v: jax.Array, ckv: CompressedKV, policy: Policy, *,
           counts: jax.Array | None = None, scale: float | None = None, implementation: str | None = None,
           interpret: bool = False) -> tuple[jax.Array, CompressedKV]:
  """Attention of T new tokens over a compressed cache and each other, then the tokens appended to it.

  Args:
    q: [B, N, T, H] the new tokens' queries (post-RoPE, at positions next_pos + t).
    k, v: [B, K, T, H] their keys (post-RoPE) and values.
    ckv: the layer's CompressedKV (donated: do not reuse the argument).
    policy: the static policy the cache was built with (decides eviction on append).
    counts: i32[B] real tokens per row (default T); a row's tokens from counts[b] on are ignored.
    scale: softmax scale, default 1/sqrt(H).
    implementation, interpret: how appended tokens are quantized, as in `akv.append`.

  Returns:
    (out [B, N, T, H] in q's dtype, zero for ignored tokens; the cache after the appends).
  """
  return _extend(q, k, v, ckv, policy, counts, scale, implementation, interpret)
