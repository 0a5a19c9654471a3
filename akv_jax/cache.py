"""Cache types: immutable pytrees holding exactly the bytes a cache keeps.

Axis legend (see the package docstring): B batch, S key/value length, K kv heads, H head dim, M body slots per
kv head, Z sink tokens, R recent-buffer slots, P pages, Q slots of a page.

Everything here is a plain container plus byte accounting; the transforms that fill these containers live in
`quant`, `selection` and `pipeline`. Static layout facts (bits, group size, axis) are pytree metadata, so they
are part of the jit cache key and never traced.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

QuantAxis = Literal["channel", "token"]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKV:
  """An uncompressed cache of one layer, right-padded.

  Attributes:
    k: [B, K, S, H] keys, post-RoPE.
    v: [B, K, S, H] values.
    lengths: i32[B] valid tokens per row, or i32[B, K] per kv head (a decompressed cache whose heads kept
      different numbers of tokens). Valid tokens are the first `lengths` along S.
    positions: i32[B, K, S] original position of every stored token, or None for 0..S-1.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array
  positions: jax.Array | None = None

  @property
  def shape(self) -> tuple[int, int, int, int]:
    """(B, K, S, H)."""
    return tuple(self.k.shape)  # type: ignore[return-value]

  def head_lengths(self) -> jax.Array:
    """i32[B, K] valid tokens per kv head."""
    b, kh = self.k.shape[:2]
    lengths = jnp.asarray(self.lengths, jnp.int32)
    return jnp.broadcast_to(lengths[:, None] if lengths.ndim == 1 else lengths, (b, kh))

  def token_positions(self) -> jax.Array:
    """i32[B, K, S] original positions (0..S-1 when none were recorded)."""
    if self.positions is not None:
      return self.positions
    b, kh, s, _ = self.k.shape
    return jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, kh, s))

  def valid(self) -> jax.Array:
    """bool[B, K, S]: True where a slot holds a real token."""
    return jnp.arange(self.k.shape[2])[None, None, :] < self.head_lengths()[:, :, None]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantizedTensor:
  """Asymmetric min/max codes of a [..., S, H] tensor, packed along H.

  Packing: with n = 8 // bits codes per byte, byte j of a row holds elements j, j + H/n, ..., j + (n-1)H/n,
  element i * H/n + j in bits [i * bits, (i + 1) * bits). Each unpacked sub-block is then a contiguous range of
  the head dim, which is what a fused kernel wants (no value slicing, no concatenation).

  Attributes:
    codes: u8[..., S, H * bits / 8].
    scale: f16[..., S / group, H] when axis == "channel" (KIVI keys: a group is `group` consecutive tokens of
      one channel), f16[..., S, H / group] when axis == "token" (a group is `group` consecutive channels of one
      token).
    zero: the group minimum, same shape and dtype as scale.
    outliers: [..., S, O] the O outlier channels of every token in the quantized input's dtype, or None
      (KVQuant's dense-and-sparse split, per channel). Which channels they are is held once per (row, kv head)
      beside the tensor (`CompressedKV.outlier_channels`); those channels were zeroed before quantizing, so
      their codes decode to exactly 0 (a constant group) and a reader adds q[channels] . outliers to the scores.
    bits, group, axis: static layout.
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array
  outliers: jax.Array | None = None
  bits: int = dataclasses.field(metadata=dict(static=True))
  group: int = dataclasses.field(metadata=dict(static=True))
  axis: QuantAxis = dataclasses.field(metadata=dict(static=True))

  @property
  def shape(self) -> tuple[int, ...]:
    """Shape of the tensor the codes stand for, [..., S, H]."""
    return (*self.codes.shape[:-1], self.codes.shape[-1] * 8 // self.bits)

  @property
  def num_outliers(self) -> int:
    """O: outlier channels held beside the codes (0 when none)."""
    return 0 if self.outliers is None else self.outliers.shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressedKV:
  """One layer's compressed cache.

  Token layout per (row, kv head): Z bf16 sink tokens, then a "logical" sequence of kept tokens in original
  order, split in two: the body (selected tokens, quantized or bf16) and the recent buffer (bf16). The split point
  differs for keys and values, following KIVI's residual rule:

    keys:   body slots [0, key_fill)      recent slots [0, recent_fill)    (recent slot j = logical key_fill + j)
    values: body slots [0, value_fill)    recent slots [value_fill - key_fill, recent_fill)

  value_fill >= key_fill always: a token whose key still sits in the recent buffer may already have its value
  quantized in body slot key_fill + j (values leave the recent window one at a time, keys a whole group at a
  time).

  Body storage is either per head, body arrays [B, K, M, H] (page_table is None), or a page pool shared by the
  heads of a row, body arrays [B, 1, P * Q, H] with page_table i32[B, K, P_max] mapping the logical body slot
  i of head k to pool slot page_table[b, k, i // Q] * Q + i % Q. The pool lets heads keep different numbers of
  tokens (AdaKV) while the layer stores only the sum of their budgets.

  Attributes:
    sink_k, sink_v: [B, K, Z, H] bf16, the first Z tokens (fewer valid when a row is shorter).
    body_k, body_v: QuantizedTensor or bf16 array, [B, K, M, H] or [B, 1, P * Q, H] (see above).
    body_pos: i32[B, K, M] or i32[B, 1, P * Q] original positions of body slots, -1 where empty.
    key_fill, value_fill: i32[B, K] body slots holding a valid key / value.
    recent_k, recent_v: [B, K, R, H] bf16 recent buffer.
    recent_pos: i32[B, K, R] original positions of recent slots, -1 where empty.
    recent_fill: i32[B, K] valid recent slots.
    sink_fill: i32[B] valid sink slots.
    next_pos: i32[B] original position the next appended token gets.
    page_table: i32[B, K, P_max] or None; -1 marks pages a head does not own (its capacity ends there).
    outlier_channels: i32[B, K, O] the key channels held at 16 bits beside the body's key codes
      (`QuantizedTensor.outliers`), chosen per row and kv head from the prompt, or None.
    rotation: int8[B, K, 2, H] the random signs of the rotated storage (akv_jax.rotation: keys, then values), or
      None. When present, every stored key and value (sinks, body, recent) is in the rotated basis.
    state: the policy's decode rule's own state, a pytree of its `state_type` (H2O's accumulated attention,
      akv_jax.decode_rules.AttentionTotals), or None for rules that keep none.
    page_size: Q, static; 1 when unpaged.
    dropped: i32[B, K] tokens dropped because a non-evicting cache was full (`akv.checked` turns this into
      an error; it stays 0 when the capacity reserved at compress time suffices).
  """

  sink_k: jax.Array
  sink_v: jax.Array
  body_k: QuantizedTensor | jax.Array
  body_v: QuantizedTensor | jax.Array
  body_pos: jax.Array
  key_fill: jax.Array
  value_fill: jax.Array
  recent_k: jax.Array
  recent_v: jax.Array
  recent_pos: jax.Array
  recent_fill: jax.Array
  sink_fill: jax.Array
  next_pos: jax.Array
  dropped: jax.Array
  page_table: jax.Array | None = None
  state: Any = None
  rotation: jax.Array | None = None
  outlier_channels: jax.Array | None = None
  page_size: int = dataclasses.field(default=1, metadata=dict(static=True))

  @property
  def num_kv_heads(self) -> int:
    return self.sink_k.shape[1]

  @property
  def head_dim(self) -> int:
    return self.sink_k.shape[3]

  @property
  def batch(self) -> int:
    return self.sink_k.shape[0]

  @property
  def paged(self) -> bool:
    return self.page_table is not None

  @property
  def body_capacity(self) -> int:
    """M: logical body slots each head can address."""
    if self.page_table is None:
      return self.body_pos.shape[-1]
    return self.page_table.shape[-1] * self.page_size

  @property
  def recent_capacity(self) -> int:
    return self.recent_k.shape[2]

  @property
  def scores(self):
    raise AttributeError("CompressedKV.scores moved into the decode rule's state: H2O's accumulated attention is "
                         "ckv.state.scores (akv_jax.decode_rules.AttentionTotals)")

  def kept_tokens(self) -> jax.Array:
    """i32[B, K]: tokens this cache answers attention with, per kv head."""
    return self.sink_fill[:, None] + self.key_fill + self.recent_fill


def nbytes(tree) -> int:
  """Bytes actually held by every array in a cache pytree (any of the types above, or a tuple of them)."""
  return int(sum(np.prod(x.shape, dtype=np.int64) * jnp.dtype(x.dtype).itemsize
                 for x in jax.tree_util.tree_leaves(tree)))


def dense_bf16_bytes(kv: DenseKV) -> int:
  """Bytes of the same K/V held densely in bf16 (the reference size compression ratios are measured against)."""
  return int(2 * (np.prod(kv.k.shape, dtype=np.int64) + np.prod(kv.v.shape, dtype=np.int64)))


def compression_ratio(kv, ckv) -> float:
  """bf16-dense bytes of `kv` (a DenseKV or a sequence of them) over the bytes `ckv` actually holds."""
  kvs = kv if isinstance(kv, (tuple, list)) else (kv,)
  return sum(dense_bf16_bytes(x) for x in kvs) / nbytes(ckv)
