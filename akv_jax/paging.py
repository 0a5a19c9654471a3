"""Dense <-> paged body layouts of a compressed cache (the vLLM / SGLang page-table convention).

Paged form: a row's body is a pool of pages of Q slots, [B, 1, P * Q, ...], shared by its kv heads, and
page_table i32[B, K, P_max] maps head k's logical page p to pool page page_table[b, k, p] (-1: the head owns no
such page). This is vLLM's block table with one table per kv head instead of per sequence, which is what lets
AdaKV give heads different budgets; the fused decode kernel reads either form.

Dense form: each head's body is its own [B, K, M, ...] slice.

Both conversions move no token between logical slots, so fills, positions and H2O scores keep their meaning and
attention is unchanged (tests check it).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from akv_jax import body as _body
from akv_jax import validation
from akv_jax.cache import CompressedKV, QuantizedTensor


def _key_group(ckv: CompressedKV) -> int:
  k = ckv.body_k
  return k.group if isinstance(k, QuantizedTensor) and k.axis == "channel" else 1


def to_paged(ckv: CompressedKV, page_size: int) -> CompressedKV:
  """A dense-body cache in paged form: head k's M slots become pool pages k * M/Q .. (k + 1) * M/Q - 1.

  Args:
    ckv: a CompressedKV whose body is per head ([B, K, M, ...]).
    page_size: Q, slots per page (static): a divisor of M, and a multiple of the key group when keys are
      quantized per channel (a page must hold whole scale rows).

  Returns:
    The same cache with body leaves [B, 1, K * M, ...] and page_table i32[B, K, M / Q]. The pool is the dense
    body reshaped, so this costs no copy; pages can then be reassigned by rewriting the table. Leaves other
    than the body are shared with `ckv`: copy one of the two before donating the other to `append`.
  """
  validation.compressed(ckv)
  if ckv.paged:
    raise ValueError("to_paged: the cache is already paged")
  b, kh = ckv.batch, ckv.num_kv_heads
  m = ckv.body_pos.shape[2]
  if page_size < 1 or m % page_size:
    raise ValueError(f"page_size={page_size} must divide the body capacity M={m}")
  if page_size % _key_group(ckv):
    raise ValueError(f"page_size={page_size} must be a multiple of the key group {_key_group(ckv)} "
                     "(keys are quantized per channel over groups of tokens)")
  pages = m // page_size
  pool = lambda leaf: leaf.reshape(leaf.shape[0], 1, -1, *leaf.shape[3:])  # noqa: E731
  body_k, body_v, body_pos = jax.tree_util.tree_map(pool, (ckv.body_k, ckv.body_v, ckv.body_pos))
  table = jnp.broadcast_to((jnp.arange(kh, dtype=jnp.int32)[:, None] * pages
                            + jnp.arange(pages, dtype=jnp.int32)[None, :]), (b, kh, pages))
  return dataclasses.replace(ckv, body_k=body_k, body_v=body_v, body_pos=body_pos, page_table=table,
                             page_size=page_size)


def to_dense(ckv: CompressedKV) -> CompressedKV:
  """A paged cache with each head's pages gathered into its own [B, K, P_max * Q, ...] body.

  Every head gets P_max pages of room; slots of pages a head did not own hold position -1 and zero codes, and
  lie past the head's fills, so nothing reads them.
  """
  validation.compressed(ckv)
  if not ckv.paged:
    raise ValueError("to_dense: the cache is not paged")
  q = ckv.page_size
  owned = jnp.repeat(ckv.page_table >= 0, q, axis=-1)                      # bool[B, K, P_max * Q]

  def gather(leaf, fill=0):
    heads = _body.to_heads(ckv, leaf)
    stride = owned.shape[2] // heads.shape[2]      # channel-grouped key scales keep one row per key group
    keep = owned[:, :, ::stride].reshape(owned.shape[:2] + (heads.shape[2],) + (1,) * (heads.ndim - 3))
    return jnp.where(keep, heads, fill).astype(leaf.dtype)

  body_k, body_v = jax.tree_util.tree_map(gather, (ckv.body_k, ckv.body_v))
  body_pos = gather(ckv.body_pos, -1)
  return dataclasses.replace(ckv, body_k=body_k, body_v=body_v, body_pos=body_pos, page_table=None, page_size=1)
