"""Placing params and compressed caches on a device mesh: batch over a data axis, kv heads over a model axis.

Megatron-style: attention projections are split by heads (q/k/v by output columns, o by input rows), the MLP by
its hidden units, so each model shard computes its own heads end to end and one all-reduce closes each block.
Caches follow their kv heads. jit then partitions prefill and decode from these input shardings.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from akv_jax.pooled import PooledCache

_COLUMN = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # [D, out]: split out
_ROW = ("o_proj", "down_proj")                                     # [in, D]: split in


def param_specs(params, *, model_axis: str = "model"):
  """PartitionSpec for every parameter leaf."""

  def spec(path, leaf):
    names = [getattr(k, "key", None) for k in path]
    if any(n in _COLUMN for n in names):
      return P(None, model_axis)
    if any(n in _ROW for n in names):
      return P(model_axis, None)
    return P(*([None] * leaf.ndim))

  return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params, mesh: Mesh, *, model_axis: str = "model"):
  specs = param_specs(params, model_axis=model_axis)
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)


def cache_specs(cache, *, data_axis: str = "data", model_axis: str = "model"):
  """PartitionSpec for every leaf of a (multi-layer) compressed cache: [B, K, ...] leaves split on both axes,
  pooled AdaKV bodies [B, 1, ...] and per-row arrays [B] on the data axis only."""

  def specs(tree, kh: int):
    def spec(leaf):
      if leaf.ndim >= 2 and leaf.shape[1] == kh:
        return P(data_axis, model_axis, *([None] * (leaf.ndim - 2)))
      return P(data_axis, *([None] * (leaf.ndim - 1)))

    return jax.tree_util.tree_map(spec, tree)

  if isinstance(cache, PooledCache):   # its group pools are [B, 1, ...] leaves like a pooled AdaKV body
    return specs(cache, cache.layers[0].num_kv_heads)
  return tuple(specs(c, c.num_kv_heads) for c in cache)


def shard_cache(cache, mesh: Mesh, *, data_axis: str = "data", model_axis: str = "model"):
  specs = cache_specs(cache, data_axis=data_axis, model_axis=model_axis)
  return jax.tree_util.tree_map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), cache, specs)


def shard_batch(x: jax.Array, mesh: Mesh, *, data_axis: str = "data") -> jax.Array:
  """Token or length arrays [B, ...] split over the data axis."""
  return jax.device_put(x, NamedSharding(mesh, P(data_axis, *([None] * (x.ndim - 1)))))
