"""Decode-time maintenance of a compressed cache: append one token, accumulate attention for H2O.

append follows KIVI's residual rule. The new token enters the bf16 recent buffer. Once more than `recent` values
are in bf16, the oldest value leaves and is quantized per token into the body (one token per step). Keys leave a
whole group at a time: when the `flush` oldest recent keys all have their values in the body, they are quantized
together per channel (a group of one token would be a silent no-op of per-channel quantization). Keys therefore
keep between `recent` and `recent + flush - 1` tokens in bf16, values exactly `recent`, and the body the cache
grows into was reserved at compress time.

Bounded-memory policies evict instead: StreamingLLM drops the token leaving the window, H2O keeps it only if its
accumulated attention beats the weakest heavy hitter, which it then replaces.

Nothing is written out of bounds: a token that finds no room is dropped and counted in `dropped`, which
`akv_jax.checks.checked` turns into an error.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from akv_jax import body as _body
from akv_jax import dispatch, validation
from akv_jax import rotation as _rotation
from akv_jax.cache import CompressedKV, QuantizedTensor
from akv_jax.decode_rules import DECODE_RULES, DecodeRule
from akv_jax.policy import Policy
from akv_jax.quant import quantize, spec_of


def _write_body(ckv: CompressedKV, stored, rows: jax.Array, first_slot: jax.Array, enabled: jax.Array, impl):
  """Writes rows [B, K, n, H] (quantized like `stored`) into the body at logical slots first_slot + 0..n-1.

  impl = (implementation, interpret) of the quantization (akv.quantize's dispatch).
  """
  n = rows.shape[2]
  if isinstance(stored, QuantizedTensor):
    # Outlier key channels (akv_jax.outliers): a flushed group is split on the channels chosen at prefill.
    channels = ckv.outlier_channels if stored.outliers is not None else None
    rows = quantize(rows, spec_of(stored), channels=channels, implementation=impl[0], interpret=impl[1])
  total = _body.flatten_leaf(ckv.body_pos).shape[1]

  def write(leaf, data):
    flat = _body.flatten_leaf(leaf)
    n_leaf = data.shape[2]
    slots = first_slot[..., None] + jnp.arange(n_leaf, dtype=jnp.int32) * (n // n_leaf)
    out = _body.write_rows(flat, data, _body.pool_index(ckv, slots), enabled, total)
    return out.reshape(leaf.shape)

  return jax.tree_util.tree_map(write, stored, rows)


def _write_pos(ckv: CompressedKV, pos: jax.Array, slot: jax.Array, enabled: jax.Array) -> jax.Array:
  flat = _body.flatten_leaf(ckv.body_pos)
  out = _body.write_rows(flat, pos[..., None], _body.pool_index(ckv, slot[..., None]), enabled, flat.shape[1])
  return out.reshape(ckv.body_pos.shape)


def _push(ckv: CompressedKV, rule: DecodeRule, k_t, v_t, score=None, rows=None):
  """Step 1: the new token goes to the sinks while they are not full, else to the recent buffer.

  score: f32[B, K] attention the token has already received (akv_jax.extend), else 0; the rule's state takes it.
  rows: bool[B] rows that take a token (akv_jax.extend's ragged chunks); the others are left as they are.
  """
  z = ckv.sink_k.shape[2]
  rows = jnp.ones(ckv.sink_fill.shape, bool) if rows is None else rows
  to_sink = (ckv.sink_fill < z) & rows                                   # [B]
  sink_on = jnp.broadcast_to(to_sink[:, None], ckv.key_fill.shape)
  sink_k = _body.set_slot(ckv.sink_k, jnp.broadcast_to(ckv.sink_fill[:, None], sink_on.shape), k_t, sink_on)
  sink_v = _body.set_slot(ckv.sink_v, jnp.broadcast_to(ckv.sink_fill[:, None], sink_on.shape), v_t, sink_on)
  nk = ckv.recent_fill
  room = nk < ckv.recent_capacity
  to_recent = ~sink_on & rows[:, None]
  on = to_recent & room
  pos = jnp.broadcast_to(ckv.next_pos[:, None], nk.shape)
  updates = dict(
      sink_k=sink_k, sink_v=sink_v, sink_fill=ckv.sink_fill + to_sink.astype(jnp.int32),
      recent_k=_body.set_slot(ckv.recent_k, nk, k_t, on), recent_v=_body.set_slot(ckv.recent_v, nk, v_t, on),
      recent_pos=_body.set_slot(ckv.recent_pos, nk, pos, on), recent_fill=nk + on.astype(jnp.int32),
      next_pos=ckv.next_pos + rows.astype(jnp.int32), dropped=ckv.dropped + (to_recent & ~room).astype(jnp.int32))
  score = jnp.zeros(nk.shape) if score is None else score
  updates["state"] = rule.push(ckv.state, nk, score, on, ckv.recent_capacity)
  return dataclasses.replace(ckv, **updates)


def _flush_kivi(ckv: CompressedKV, recent: int, flush: int, impl, rows) -> CompressedKV:
  """Steps 2-3 for non-evicting caches: one value leaves per step, keys leave `flush` at a time (rows bool[B]:
  the rows that took a token)."""
  cap = _body.head_capacity(ckv)
  kb, vb, nk = ckv.key_fill, ckv.value_fill, ckv.recent_fill
  need_v = (kb + nk - vb > recent) & (vb < cap) & rows[:, None]
  d = vb - kb
  value = _body.get_slot(ckv.recent_v, d)[:, :, None]
  body_v = _write_body(ckv, ckv.body_v, value, vb, need_v, impl)
  body_pos = _write_pos(ckv, _body.get_slot(ckv.recent_pos, d), vb, need_v)
  vb = vb + need_v.astype(jnp.int32)
  ckv = dataclasses.replace(ckv, body_v=body_v, body_pos=body_pos, value_fill=vb)

  need_k = (vb - kb >= flush) & (kb + flush <= cap) & rows[:, None]
  body_k = _write_body(ckv, ckv.body_k, ckv.recent_k[:, :, :flush], kb, need_k, impl)
  return dataclasses.replace(
      ckv, body_k=body_k, key_fill=kb + flush * need_k.astype(jnp.int32),
      recent_fill=nk - flush * need_k.astype(jnp.int32),
      recent_k=_body.shift(ckv.recent_k, flush, need_k), recent_v=_body.shift(ckv.recent_v, flush, need_k),
      recent_pos=_body.shift(ckv.recent_pos, flush, need_k))


def _flush_evict(ckv: CompressedKV, rule: DecodeRule, recent: int, impl, rows) -> CompressedKV:
  """Step 2 for bounded caches: the token leaving the window moves to the body slot the rule picks (a free one,
  or a weaker token's), or is dropped (rows bool[B]: the rows that took a token)."""
  kb, nk = ckv.key_fill, ckv.recent_fill
  leave = (nk > recent) & rows[:, None]
  cap = _body.head_capacity(ckv)
  target, place, state = rule.place(ckv.state, kb, cap, leave, ckv.recent_capacity)
  grow = leave & (kb < cap)
  body_k = _write_body(ckv, ckv.body_k, ckv.recent_k[:, :, :1], target, place, impl)
  body_v = _write_body(ckv, ckv.body_v, ckv.recent_v[:, :, :1], target, place, impl)
  body_pos = _write_pos(ckv, ckv.recent_pos[:, :, 0], target, place)
  return dataclasses.replace(
      ckv, body_k=body_k, body_v=body_v, body_pos=body_pos, state=state,
      key_fill=kb + grow.astype(jnp.int32), value_fill=ckv.value_fill + grow.astype(jnp.int32),
      recent_fill=nk - leave.astype(jnp.int32), recent_k=_body.shift(ckv.recent_k, 1, leave),
      recent_v=_body.shift(ckv.recent_v, 1, leave), recent_pos=_body.shift(ckv.recent_pos, 1, leave))


def _flush_unit(ckv: CompressedKV) -> int:
  """Keys leave the recent buffer a whole channel group at a time when quantized per channel, else one by one."""
  body_k = ckv.body_k
  return body_k.group if isinstance(body_k, QuantizedTensor) and body_k.axis == "channel" else 1


def _append(ckv: CompressedKV, k_t: jax.Array, v_t: jax.Array, policy: Policy, implementation: str | None = None,
            interpret: bool = False, score: jax.Array | None = None, rows: jax.Array | None = None) -> CompressedKV:
  """append's body; rows bool[B] (default all) are the rows that take the token, the others are left as they are."""
  dispatch.check(implementation, interpret)
  impl = (implementation, interpret)
  validation.compressed(ckv)
  validation.token(k_t, ckv, "k_t")
  validation.token(v_t, ckv, "v_t")
  flush = _flush_unit(ckv)
  if policy.evicting and (flush != 1 or isinstance(ckv.body_v, QuantizedTensor)):
    raise ValueError(f"policy {policy.name!r} evicts but this cache was not built by an evicting policy "
                     "(its body is quantized)")
  check_state(ckv, policy)
  if ckv.rotation is not None:   # rotated storage: the token joins the cache in its basis
    k_t = _rotation.rotate(k_t, ckv.rotation[:, :, 0]).astype(k_t.dtype)
    v_t = _rotation.rotate(v_t, ckv.rotation[:, :, 1]).astype(v_t.dtype)
  # The recent capacity is the bf16 window plus one flush unit of headroom (see Policy.layout).
  recent = ckv.recent_capacity - flush
  rows = jnp.ones(ckv.sink_fill.shape, bool) if rows is None else rows
  ckv = _push(ckv, policy.decode, k_t, v_t, score, rows)
  if policy.evicting:
    return _flush_evict(ckv, policy.decode, recent, impl, rows)
  return _flush_kivi(ckv, recent, flush, impl, rows)


@functools.partial(jax.jit, static_argnames=("policy", "implementation", "interpret"), donate_argnames=("ckv",))
def append(ckv: CompressedKV, k_t: jax.Array, v_t: jax.Array, policy: Policy, *, implementation: str | None = None,
           interpret: bool = False) -> CompressedKV:
  """Appends one decoded token to every row of a layer's compressed cache.

  Args:
    ckv: the layer's CompressedKV (donated: do not reuse the argument).
    k_t, v_t: [B, K, H] the new token's key (post-RoPE) and value.
    policy: the static policy the cache was built with (decides eviction).
    implementation: how tokens leaving the bf16 window are quantized into the body, dispatched like
      `akv.quantize`: "xla", "pallas" (the fused quantize-and-pack kernel; bit-identical), or None (Pallas on a
      GPU). A cache whose body is bf16 quantizes nothing.
    interpret: run the kernel in interpret mode (CPU tests).

  Returns:
    The updated CompressedKV; `dropped` counts tokens that found no room (reserve more at compress time).
  """
  return _append(ckv, k_t, v_t, policy, implementation, interpret)


def check_state(ckv: CompressedKV, policy: Policy) -> None:
  """Raises unless the cache carries the state its policy's decode rule keeps (a cache decoded with another
  policy than the one that built it)."""
  want = policy.decode.state_type
  have = type(ckv.state) if ckv.state is not None else None
  if want is not have:
    def says(t):
      return "no decode-rule state" if t is None else f"decode-rule state {t.__name__}"
    raise ValueError(f"policy {policy.name!r} has decode rule {policy.decode.name!r}, which keeps {says(want)}, "
                     f"but this cache carries {says(have)}: decode a cache with the policy that built it")


@functools.partial(jax.jit, static_argnames=("policy",))
def observe(ckv: CompressedKV, probs: jax.Array, policy: Policy | None = None) -> CompressedKV:
  """Gives the policy's decode rule a step's attention probabilities f32[B, K, M + R] (from
  `attend(..., return_probs=True)`); H2O adds them to each slot's accumulated attention.

  policy: the policy the cache was built with; when omitted, the rule is the one whose state the cache carries
  (HeavyHitter for AttentionTotals). A cache whose rule keeps no state is returned unchanged.
  """
  if policy is not None:
    check_state(ckv, policy)
    rule = policy.decode
  elif ckv.state is None:
    return ckv
  else:
    rule = _RULE_OF_STATE[type(ckv.state)]
  return dataclasses.replace(ckv, state=rule.observe(ckv.state, probs))


# The rule that owns each state type, for observe without a policy.
_RULE_OF_STATE = {cls.state_type: cls() for cls in DECODE_RULES.values() if cls.state_type is not None}
