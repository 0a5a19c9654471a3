"""Decode rules: what a compressed cache does with the tokens decoding appends (akv_jax.decode.append).

A rule is a frozen, hashable dataclass held by the policy, and it owns whatever state it keeps in the cache
(`CompressedKV.state`, a pytree of the rule's own type, None for stateless rules). `KiviResidual` never drops a
token: new tokens enter the bf16 recent window and the oldest leave it into the (quantized) body, which was sized
at prefill for the tokens decoding will add. `SlidingWindow` (StreamingLLM) and `HeavyHitter` (H2O) bound the
memory instead and evict: a token leaving the window goes to a free body slot, or to the slot `place` picks, or
is dropped. `HeavyHitter` picks by accumulated attention, which is its state (`AttentionTotals`).

Axis legend: B batch, K kv heads, M logical body slots per head, R recent slots per head.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from akv_jax import body as _body


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionTotals:
  """HeavyHitter's state.

  Attributes:
    scores: f32[B, K, M + R] attention each body slot (then each recent slot) has received so far: its prefill
      score, plus every decode step's probabilities (`akv.observe`) and every extended chunk's (`akv.extend`).
      Sinks are never evicted, so they have none.
  """

  scores: jax.Array


@dataclasses.dataclass(frozen=True)
class DecodeRule:
  """Base of the decode rules: stateless, and (unless `evicting`) never dropping a token.

  Class attributes:
    name: registry name.
    evicting: memory stays bounded; a token leaving the recent window may be dropped (bf16 body only).
    state_type: the type of the state this rule keeps in `CompressedKV.state`, or None.
  """

  name: ClassVar[str] = ""
  evicting: ClassVar[bool] = False
  state_type: ClassVar[type | None] = None

  @property
  def accumulates(self) -> bool:
    """The rule's state grows by the attention each step gives the cache (`observe` does something)."""
    return self.state_type is AttentionTotals

  def initial_state(self, slot_scores: jax.Array) -> Any:
    """The state a freshly compressed cache starts with; slot_scores f32[B, K, M + R] are the selection
    scores of the tokens placed in the body and recent slots (0 where a slot is empty)."""
    del slot_scores
    return None

  def observe(self, state: Any, probs: jax.Array) -> Any:
    """State after a step's attention probabilities f32[B, K, M + R] over the body and recent slots."""
    del probs
    return state

  def push(self, state: Any, slot: jax.Array, score: jax.Array, enabled: jax.Array, recent_capacity: int) -> Any:
    """State after a new token entered recent slot i32[B, K] where enabled bool[B, K], having received
    attention score f32[B, K] already (0 unless `akv.extend` saw it attended by later tokens of its chunk)."""
    del slot, score, enabled, recent_capacity
    return state

  def place(self, state: Any, key_fill: jax.Array, capacity: jax.Array, leave: jax.Array, recent_capacity: int):
    """Where the token leaving the recent window (recent slot 0) goes, for evicting rules.

    Args:
      key_fill: i32[B, K] body slots in use; capacity: i32[B, K] body slots each head owns.
      leave: bool[B, K] heads whose oldest recent token leaves the window this step.

    Returns:
      (target i32[B, K] body slot, write bool[B, K] whether it is written there, the state after the move and
      the recent window's shift by one). Here: the next free slot, or dropped when the body is full.
    """
    del recent_capacity
    return key_fill, leave & (key_fill < capacity), state


@dataclasses.dataclass(frozen=True)
class KiviResidual(DecodeRule):
  """KIVI's residual rule: values leave the bf16 window one at a time, keys a whole quantization group at a time."""

  name = "kivi_residual"


@dataclasses.dataclass(frozen=True)
class SlidingWindow(DecodeRule):
  """StreamingLLM: the token leaving the recent window is dropped once the body (if any) is full."""

  name = "sliding_window"
  evicting = True


@dataclasses.dataclass(frozen=True)
class HeavyHitter(DecodeRule):
  """H2O: the token leaving the window is kept only if its accumulated attention beats the weakest body token,
  which it replaces."""

  name = "heavy_hitter"
  evicting = True
  state_type = AttentionTotals

  def initial_state(self, slot_scores):
    return AttentionTotals(scores=slot_scores.astype(jnp.float32))

  def observe(self, state, probs):
    if probs.shape != state.scores.shape:
      raise ValueError(f"probs shape {probs.shape} does not match the cache's score slots {state.scores.shape}")
    return AttentionTotals(scores=state.scores + probs.astype(jnp.float32))

  def push(self, state, slot, score, enabled, recent_capacity):
    m = state.scores.shape[-1] - recent_capacity
    return AttentionTotals(scores=_body.set_slot(state.scores, m + slot, score, enabled))

  def place(self, state, key_fill, capacity, leave, recent_capacity):
    scores = state.scores
    m = scores.shape[-1] - recent_capacity
    target, write = key_fill, leave & (key_fill < capacity)
    if m > 0:
      body = jnp.where(jnp.arange(m)[None, None, :] < key_fill[..., None], scores[..., :m], jnp.inf)
      victim = jnp.argmin(body, axis=-1).astype(jnp.int32)
      mine = scores[..., m]
      full = key_fill >= capacity
      target = jnp.where(full, victim, key_fill)
      write = leave & (~full | (mine > jnp.min(body, axis=-1)))
      scores = _body.set_slot(scores, target, mine, write)
    scores = jnp.concatenate([scores[..., :m], _body.shift(scores[..., m:], 1, leave)], axis=-1)
    return target, write, AttentionTotals(scores=scores)


DECODE_RULES: dict[str, type[DecodeRule]] = {cls.name: cls for cls in (KiviResidual, SlidingWindow, HeavyHitter)}
