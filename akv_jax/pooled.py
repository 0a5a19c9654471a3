"""A multi-layer cache whose layer groups share one page pool each: static memory, a dynamic split per request.

Axis legend: B batch, K kv heads, L layers, P pages of a group's pool, Q slots of a page, H head dim.

AdaKV lets the heads of one layer keep different numbers of tokens by storing them in a page pool with a page
table per kv head. `PooledCache` carries that one level up (the `Adaptive` budget rule): the layers stored alike
(same bits and groups: a "layer group") share one pool per row, `[B, 1, P * Q, ...]`, and each layer keeps its own
page table `i32[B, K, P_max]` into it, so the split of a group's pages among its (layer, kv head) pairs is an
array, chosen per row from the prompt's attention and never a shape: nothing recompiles per prompt, and rows of
one batch split differently.

Each layer is read as an ordinary CompressedKV (`cache[layer]`, a view whose body is the group's pool), so
attention, appends, the chunked path and the fused kernel need nothing new: they already read a paged body
through its table. A step that updates layer l hands the view back with `cache.replace(l, view)`; the pool then
carries layer l's writes to the next layer of the group. Between those calls the pool is held once: the layers'
own body fields are empty placeholders ([B, 1, 0, ...]), so `akv.nbytes(cache)` counts every byte once.
"""

from __future__ import annotations

import dataclasses

import jax

from akv_jax.cache import CompressedKV


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerPool:
  """One layer group's page pool: the body leaves every layer of the group reads through its page table.

  Attributes:
    body_k, body_v: QuantizedTensor or bf16 array, [B, 1, P * Q, ...].
    body_pos: i32[B, 1, P * Q] original positions, -1 where a slot is empty.
  """

  body_k: object
  body_v: object
  body_pos: jax.Array


def _empty(leaf: jax.Array) -> jax.Array:
  return leaf[:, :, :0]


def _without_body(ckv: CompressedKV) -> CompressedKV:
  return dataclasses.replace(ckv, body_k=jax.tree_util.tree_map(_empty, ckv.body_k),
                             body_v=jax.tree_util.tree_map(_empty, ckv.body_v), body_pos=_empty(ckv.body_pos))


def _pool_of(ckv: CompressedKV) -> LayerPool:
  return LayerPool(body_k=ckv.body_k, body_v=ckv.body_v, body_pos=ckv.body_pos)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PooledCache:
  """A multi-layer cache whose layer groups each share one page pool (see the module docstring).

  Attributes:
    layers: one CompressedKV per layer, paged, with empty body placeholders (the body is its group's pool).
    pools: one LayerPool per layer group.
    groups: static, the pool index of each layer.
  """

  layers: tuple[CompressedKV, ...]
  pools: tuple[LayerPool, ...]
  groups: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))

  @staticmethod
  def build(layers, groups) -> PooledCache:
    """From per-layer views (each layer's body the whole group pool, as its last writer left it): the pool of
    each group is taken from the last layer of the group, which `compress_layers` fills last."""
    groups = tuple(int(g) for g in groups)
    if len(groups) != len(layers):
      raise ValueError(f"got {len(groups)} group indices for {len(layers)} layers")
    last = {g: i for i, g in enumerate(groups)}
    pools = tuple(_pool_of(layers[last[g]]) for g in sorted(last))
    return PooledCache(layers=tuple(_without_body(c) for c in layers), pools=pools, groups=groups)

  def __len__(self) -> int:
    return len(self.layers)

  def __getitem__(self, layer: int) -> CompressedKV:
    """Layer `layer` as an ordinary paged CompressedKV whose body is its group's pool."""
    pool = self.pools[self.groups[layer]]
    return dataclasses.replace(self.layers[layer], body_k=pool.body_k, body_v=pool.body_v, body_pos=pool.body_pos)

  def __iter__(self):
    return (self[i] for i in range(len(self)))

  def replace(self, layer: int, ckv: CompressedKV) -> PooledCache:
    """This cache with layer `layer` replaced by `ckv`, a view of it after an update (its body is the pool)."""
    if not ckv.paged:
      raise ValueError(f"layer {layer} of a pooled cache must stay paged (a view from cache[{layer}])")
    g = self.groups[layer]
    pools = self.pools[:g] + (_pool_of(ckv),) + self.pools[g + 1:]
    layers = self.layers[:layer] + (_without_body(ckv),) + self.layers[layer + 1:]
    return dataclasses.replace(self, layers=layers, pools=pools)


def replace_layer(cache, layer: int, ckv: CompressedKV):
  """`cache` (a tuple of CompressedKV or a PooledCache) with layer `layer` replaced by `ckv`."""
  if isinstance(cache, PooledCache):
    return cache.replace(layer, ckv)
  return tuple(cache[:layer]) + (ckv,) + tuple(cache[layer + 1:])
