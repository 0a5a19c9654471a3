"""Budgets split across layers per request (selection.Adaptive) in one page pool per layer group
(akv_jax.pooled): the split follows each row's attention, holds the bytes of the per-layer AdaKV pools, every
attention path reads a layer through its page table, appends of one layer leave the others intact, a model
prefills and decodes it, and a new prompt does not recompile."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import models
from akv_jax.pooled import PooledCache
from akv_jax.testing import assert_attention_paths_agree, random_kv, random_queries

B, K, N, S, H, L = 2, 2, 4, 256, 64, 3
KEEP = 0.4


def _policy(budget, *, bits=2, layers=()):
  return akv.Policy(name=budget.name, scorer="snapkv", budget=budget, guards=akv.Guards(recent=32, layers=layers,
                                                                                           bits=4 if layers else None),
                    keys=None if bits is None else akv.QuantSpec(bits=bits, group=16),
                    values=None if bits is None else akv.QuantSpec(bits=bits, group=16, axis="token"))


ADAPTIVE = _policy(akv.selection.Adaptive(keep=KEEP))
ADAKV = _policy(akv.selection.AdaKV(keep=KEEP))


@pytest.fixture(scope="module")
def layers():
  kvs = tuple(random_kv(10 + i, b=B, k=K, s=S, h=H, lengths=(S, 181), dtype=jnp.bfloat16) for i in range(L))
  qs = tuple(random_queries(20 + i, b=B, n=N, t=32, h=H, dtype=jnp.bfloat16) for i in range(L))
  return kvs, qs


def _selected(ckv):
  """i32[B, K] body tokens each head was given at prefill (its pages, less the decode reserve)."""
  return np.asarray(jnp.sum(ckv.page_table >= 0, axis=-1) * ckv.page_size)


def test_the_split_follows_each_rows_attention_across_layers(layers):
  """Row 0's observation queries look only at layer 0's keys, row 1's only at layer 2's: the pages go there."""
  kvs, qs = layers
  qs = list(qs)
  for i in range(L):
    q = np.array(qs[i], np.float32)
    for row, sharp in ((0, 0), (1, 2)):
      q[row] *= 8.0 if i == sharp else 0.0   # a peaked softmax where it looks, a flat one elsewhere
    qs[i] = jnp.asarray(q, jnp.bfloat16)
  pooled = akv.compress_layers(kvs, ADAPTIVE, queries=tuple(qs), reserve=0)
  assert isinstance(pooled, PooledCache) and pooled.groups == (0, 0, 0)
  sel = np.stack([_selected(pooled[i]) for i in range(L)], axis=1)          # [B, L, K]
  lay = ADAPTIVE.layout(S, 0, L)
  mean = lay.budget_pages * lay.page_size
  assert sel.sum(axis=(1, 2)).tolist() == [L * K * mean] * B                   # the group's pages, all spent
  assert sel.max() <= (lay.max_pages - lay.reserve_pages) * lay.page_size   # within the cap
  assert sel[0, 0].sum() > sel[0, 2].sum() and sel[1, 2].sum() > sel[1, 0].sum()
  # Per-layer AdaKV gives every layer the same share.
  per_layer = akv.compress_layers(kvs, ADAKV, queries=tuple(qs), reserve=0)
  assert all(_selected(c).sum(axis=1).tolist() == [K * mean] * B for c in per_layer)


def test_one_pool_per_group_holds_the_bytes_of_the_per_layer_pools(layers):
  kvs, qs = layers
  for pol_a, pol_b in ((ADAPTIVE, ADAKV), (_policy(akv.selection.Adaptive(keep=KEEP), layers=(0,)),
                                           _policy(akv.selection.AdaKV(keep=KEEP), layers=(0,)))):
    pooled = akv.compress_layers(kvs, pol_a, queries=qs, reserve=24)
    per_layer = akv.compress_layers(kvs, pol_b, queries=qs, reserve=24)
    assert akv.nbytes(pooled) == akv.nbytes(per_layer)
    shape = akv.ratios.CacheShape(s=S, num_layers=L, kv_heads=K, head_dim=H, q_heads=N, batch=B)
    assert akv.ratios.held_bytes(pol_a, shape, reserve=24) == akv.nbytes(pooled)
  # A guard layer stored at 4 bits is its own group, with its own pool.
  assert pooled.groups == (0, 1, 1) and len(pooled.pools) == 2


@pytest.mark.parametrize("bits", [2, None])
def test_every_path_reads_a_pooled_layer_and_appends_keep_the_other_layers(layers, bits):
  kvs, qs = layers
  pol = _policy(akv.selection.Adaptive(keep=KEEP), bits=bits)
  cache = akv.compress_layers(kvs, pol, queries=qs, reserve=40)
  before = [akv.decompress(cache[i]) for i in range(L)]
  cache = cache.replace(1, akv.append(cache[1], *(jnp.ones((2, B, K, H), jnp.bfloat16) * 0.5), pol))
  for i in (0, 2):   # layer 1's write went to its own pages only
    after = akv.decompress(cache[i])
    for a, b in zip(jax.tree_util.tree_leaves(after), jax.tree_util.tree_leaves(before[i])):
      np.testing.assert_array_equal(a, b)
  for step in range(20):
    for i in range(L):
      kt, vt = (jax.random.normal(jax.random.key(100 + 7 * step + i), (2, B, K, H)) * 0.5).astype(jnp.bfloat16)
      cache = cache.replace(i, akv.append(cache[i], kt, vt, pol))
  q = random_queries(3, b=B, n=N, t=None, h=H)
  for i in range(L):
    view = cache[i]
    assert int(view.dropped.sum()) == 0
    assert_attention_paths_agree(q, view)


def test_a_model_prefills_and_decodes_a_pooled_cache_without_recompiling():
  cfg = models.LlamaConfig(vocab_size=89, hidden_size=64, intermediate_size=96, num_layers=L, num_heads=4,
                           num_kv_heads=2, max_seq_len=512)
  params = models.init_params(cfg, jax.random.key(0))
  toks = jax.random.randint(jax.random.key(1), (2, 256), 1, cfg.vocab_size)
  pol = _policy(akv.selection.Adaptive(keep=KEEP))
  logits, cache = models.prefill(cfg, params, toks, jnp.array([256, 190]), pol, reserve=8)
  assert isinstance(cache, PooledCache)
  # The pass's own split equals compress_layers over the layers it captured (its keys and queries).
  kvs, qs = models.observe_prompt(cfg, params, toks, jnp.array([256, 190]), window=32)
  again = akv.compress_layers(kvs, pol, queries=qs, reserve=8)
  for i in range(L):
    np.testing.assert_array_equal(cache[i].page_table, again[i].page_table)
  # Decode steps thread the group's pool through the layers: the same logits as a tuple of the layers' views,
  # each holding its own copy of the pool.
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  views = tuple(jax.tree_util.tree_map(jnp.copy, cache[i]) for i in range(L))
  pooled_logits, cache2 = models.decode_step(cfg, params, jax.tree_util.tree_map(jnp.copy, cache), tok, pol)
  view_logits, views2 = models.decode_step(cfg, params, views, tok, pol)
  np.testing.assert_array_equal(pooled_logits, view_logits)
  assert isinstance(cache2, PooledCache) and all(int(c.next_pos[0]) == 257 for c in cache2)
  for i in range(L):
    np.testing.assert_array_equal(akv.decompress(cache2[i]).k, akv.decompress(views2[i]).k)
  # A new prompt of the same capacity (other lengths, other content) splits differently and does not retrace.
  traces = models.llama._prefill._cache_size()
  splits = set()
  for seed, lens in ((2, (256, 120)), (3, (200, 256))):
    t = jax.random.randint(jax.random.key(seed), (2, 256), 1, cfg.vocab_size)
    _, c = models.prefill(cfg, params, t, jnp.array(lens), pol, reserve=8)
    splits.add(tuple(np.concatenate([_selected(c[i]).ravel() for i in range(L)])))
  assert len(splits) == 2 and models.llama._prefill._cache_size() == traces
  # A question run over the compressed context (extend), then generation: as with the tuple of views.
  suffix = jax.random.randint(jax.random.key(4), (2, 6), 1, cfg.vocab_size)
  logits, cache = models.prefill(cfg, params, toks, jnp.array([256, 190]), pol, reserve=20)
  views = tuple(jax.tree_util.tree_map(jnp.copy, cache[i]) for i in range(L))
  kw = dict(suffix=suffix, suffix_lengths=jnp.array([6, 4]))
  out, counts, final = models.generate_from(cfg, params, logits, cache, pol, 12, **kw)
  out_views, _, _ = models.generate_from(cfg, params, logits, views, pol, 12, **kw)
  np.testing.assert_array_equal(out, out_views)
  assert isinstance(final, PooledCache) and np.all(np.asarray(counts) == 12)


def test_pooled_errors(layers):
  kvs, qs = layers
  with pytest.raises(ValueError, match="policy 'adaptive' splits its budget across layers \\(budget='adaptive'\\): "
                                       "compress all layers together with compress_layers"):
    akv.compress(kvs[0], ADAPTIVE, queries=qs[0])
  odd = (kvs[0], random_kv(1, b=B, k=K, s=128, h=H, dtype=jnp.bfloat16), kvs[2])
  with pytest.raises(ValueError, match=r"layer 1 has a cache of shape \(2, 2, 128, 64\), layer 0 \(2, 2, 256, 64\)"):
    akv.compress_layers(odd, ADAPTIVE, queries=qs)
  cache = akv.compress_layers(kvs, ADAPTIVE, queries=qs)
  plain = akv.compress(kvs[0], ADAKV, queries=qs[0])
  with pytest.raises(ValueError, match="layer 1 of a pooled cache must stay paged"):
    cache.replace(1, dataclasses.replace(plain, page_table=None))
  with pytest.raises(ValueError, match="got 2 group indices for 3 layers"):
    PooledCache.build([cache[i] for i in range(L)], (0, 0))
