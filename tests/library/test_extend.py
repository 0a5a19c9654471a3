"""akv.extend: T new tokens over a compressed cache. Its cache equals T single appends; its attention equals dense
causal attention over the cache's kept (dequantized) tokens plus the chunk; the full policy is exact."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import attention
from akv_jax.testing import random_kv, random_queries

B, K, N, S, H, T = 2, 2, 8, 160, 32, 9
LENGTHS = (160, 97)


def _small(name):
  pol = akv.presets.fixed(name)
  return dataclasses.replace(pol, recent=min(pol.recent, 32), key_group=16, value_group=16)


def _setup(name, seed=0, reserve=T):
  pol = _small(name)
  kv = random_kv(seed, b=B, k=K, s=S, h=H, lengths=LENGTHS)
  q_obs = random_queries(seed + 1, b=B, n=N, t=32, h=H)
  ckv = akv.compress(kv, pol, queries=q_obs, layer=1, num_layers=4, reserve=reserve)
  q = random_queries(seed + 2, b=B, n=N, t=T, h=H)
  k = random_queries(seed + 3, b=B, n=K, t=T, h=H)
  v = random_queries(seed + 4, b=B, n=K, t=T, h=H)
  return pol, kv, ckv, q, k, v


def _copy(tree):
  return jax.tree_util.tree_map(jnp.copy, tree)


def _assert_same(a, b):
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _reference(q, k, v, ckv, counts):
  """Numpy: query t of row b attends to the cache's kept tokens and the chunk's tokens 0..t, one softmax."""
  dense = akv.decompress(ckv)
  keys, values, lens = np.asarray(dense.k), np.asarray(dense.v), np.asarray(dense.lengths)
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  out = np.zeros(q.shape)
  g = N // K
  for b in range(B):
    for n in range(N):
      kh = n // g
      for t in range(int(counts[b])):
        kk = np.concatenate([keys[b, kh, :lens[b, kh]], k[b, kh, :t + 1]])
        vv = np.concatenate([values[b, kh, :lens[b, kh]], v[b, kh, :t + 1]])
        s = kk @ q[b, n, t] / np.sqrt(H)
        p = np.exp(s - s.max())
        out[b, n, t] = (p / p.sum()) @ vv
  return out


def test_full_policy_equals_dense_causal_attention():
  pol, kv, ckv, q, k, v = _setup("full")
  out, ext = akv.extend(q, k, v, _copy(ckv), pol)
  for b, length in enumerate(LENGTHS):
    keys = jnp.concatenate([kv.k[b, :, :length], k[b]], axis=1)
    values = jnp.concatenate([kv.v[b, :, :length], v[b]], axis=1)
    for t in range(T):
      want = akv.dense_attention(q[b:b + 1, :, t], keys[None], values[None], jnp.array([length + t + 1]))
      np.testing.assert_allclose(out[b, :, t], want[0], rtol=1e-5, atol=1e-5)
  dense = akv.decompress(ext)
  for b, length in enumerate(LENGTHS):
    np.testing.assert_array_equal(dense.lengths[b], [length + T] * K)
    np.testing.assert_array_equal(dense.positions[b, 0, :length + T], np.arange(length + T))
    np.testing.assert_array_equal(dense.k[b, :, length:length + T], k[b])


NAMES = ["full", "streaming", "snapkv", "pyramidkv", "adakv", "tova", "knorm", "kivi2", "kivi4", "hybrid_5x",
         "hybrid_8x", "hybrid_12x"]


@pytest.mark.parametrize("name", NAMES)
def test_cache_equals_single_appends(name):
  pol, _, ckv, q, k, v = _setup(name)
  _, ext = akv.extend(q, k, v, _copy(ckv), pol)
  step = _copy(ckv)
  for t in range(T):
    step = akv.append(step, k[:, :, t], v[:, :, t], pol)
  _assert_same(ext, step)


@pytest.mark.parametrize("name", ["snapkv", "kivi2", "hybrid_8x", "hybrid_12x", "streaming", "h2o"])
def test_attention_equals_dense_over_kept_tokens_and_chunk(name):
  pol, _, ckv, q, k, v = _setup(name)
  counts = np.array([T, T - 4])
  out, _ = akv.extend(q, k, v, _copy(ckv), pol, counts=jnp.asarray(counts, jnp.int32))
  np.testing.assert_allclose(np.asarray(out), _reference(q, k, v, ckv, counts), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["snapkv", "kivi2", "adakv", "streaming"])
def test_ragged_counts_extend_each_row_by_its_own_tokens(name):
  pol, _, ckv, q, k, v = _setup(name)
  counts = (T, 4)
  out, ext = akv.extend(q, k, v, _copy(ckv), pol, counts=jnp.asarray(counts, jnp.int32))
  assert np.all(np.asarray(out[1, :, counts[1]:]) == 0), "ignored tokens' outputs are zero"
  for b, c in enumerate(counts):
    row = lambda tree: jax.tree_util.tree_map(lambda x: x[b:b + 1], tree)  # noqa: B023, E731
    _, alone = akv.extend(q[b:b + 1, :, :c], k[b:b + 1, :, :c], v[b:b + 1, :, :c], _copy(row(ckv)), pol)
    _assert_same(row(ext), alone)


def _scored_slots(ckv):
  """{(row, head, position): score} of the slots H2O scores (body then recent, sinks are not scored)."""
  pos = np.concatenate([np.asarray(ckv.body_pos), np.asarray(ckv.recent_pos)], axis=-1)
  m = ckv.body_pos.shape[-1]
  slot = np.arange(pos.shape[-1])
  valid = np.where(slot < m, slot < np.asarray(ckv.key_fill)[..., None],
                   slot - m < np.asarray(ckv.recent_fill)[..., None])
  scores = np.asarray(ckv.state.scores)
  return {(b, k, int(pos[b, k, i])): float(scores[b, k, i]) for b, k, i in zip(*np.nonzero(valid))}


def test_h2o_scores_gain_the_chunks_attention():
  """Every slot H2O keeps after a one-token extend holds its old score plus the token's attention to it (averaged
  over the G query heads), and the new token enters with its attention to itself."""
  pol, _, ckv, q, k, v = _setup("h2o")
  _, ext = akv.extend(q[:, :, :1], k[:, :, :1], v[:, :, :1], _copy(ckv), pol)
  keys, _, kpos, valid = (np.asarray(x) for x in attention.cache_slots(ckv))
  qg = np.asarray(q[:, :, 0], np.float64).reshape(B, K, N // K, H) / np.sqrt(H)
  s_old = np.einsum("bkgh,bkch->bkgc", qg, keys.astype(np.float64))
  s_new = np.einsum("bkgh,bkh->bkg", qg, np.asarray(k[:, :, 0], np.float64))[..., None]
  s = np.concatenate([np.where(valid[:, :, None], s_old, -np.inf), s_new], axis=-1)
  p = np.exp(s - s.max(-1, keepdims=True))
  p = (p / p.sum(-1, keepdims=True)).mean(2)                                  # [B, K, C + 1]
  want = {}
  for (b, kh, pos), score in _scored_slots(ckv).items():
    (c,) = np.nonzero(valid[b, kh] & (kpos[b, kh] == pos))
    want[b, kh, pos] = score + p[b, kh, c[0]]
  for b in range(B):
    for kh in range(K):
      want[b, kh, LENGTHS[b]] = p[b, kh, -1]
  got = _scored_slots(ext)
  assert len(got) == len(_scored_slots(ckv)), "one token in, one evicted: the bounded cache keeps its size"
  for key, score in got.items():
    np.testing.assert_allclose(score, want[key], rtol=1e-5, err_msg=str(key))


def test_errors():
  pol, _, ckv, q, k, v = _setup("snapkv")
  with pytest.raises(ValueError, match=r"k must be \[B, K, T, H\]"):
    akv.extend(q, k[:, :, :3], v, _copy(ckv), pol)
  with pytest.raises(ValueError, match=r"v must be \[B, K, T, H\]"):
    akv.extend(q, k, v[..., :16], _copy(ckv), pol)
  with pytest.raises(ValueError, match=r"counts shape \(3,\) must be \(2,\)"):
    akv.extend(q, k, v, _copy(ckv), pol, counts=jnp.ones((3,), jnp.int32))
  with pytest.raises(ValueError, match=r"q must be \[B, N, T, H\]"):
    akv.extend(q[:, :, 0], k, v, _copy(ckv), pol)
  with pytest.raises(ValueError, match="implementation='cuda' is not one of"):
    akv.extend(q, k, v, _copy(ckv), pol, implementation="cuda")
