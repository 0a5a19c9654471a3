"""Dense <-> paged conversions: attention unchanged (XLA and the fused kernel), round trips exact, decoding
continues on the converted cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import paging, testing

INTERPRET = jax.default_backend() != "gpu"
B, K, N, H, S = 2, 2, 8, 64, 256


def cache(preset, steps=0):
  pol = akv.presets.fixed(preset)
  kv = testing.random_kv(0, b=B, k=K, s=S, h=H, lengths=[S, 190], dtype=jnp.bfloat16)
  q_obs = testing.random_queries(1, b=B, n=N, t=32, h=H, dtype=jnp.bfloat16)
  ckv = akv.compress(kv, pol, queries=q_obs, reserve=40)
  for t in range(steps):
    kt, vt = testing.token_at(kv, jnp.array([t, t]))
    ckv = akv.append(ckv, kt, vt, pol)
  return ckv, pol


@pytest.mark.parametrize("preset,page", [("kivi2", 32), ("hybrid_8x", 32), ("snapkv", 4)])
def test_to_paged_keeps_attention_and_round_trips(preset, page):
  ckv, pol = cache(preset, steps=5)
  assert ckv.body_pos.shape[2] % page == 0
  paged = paging.to_paged(ckv, page)
  assert paged.paged and paged.body_pos.shape[1] == 1 and akv.nbytes(paged) > 0
  q = testing.random_queries(2, b=B, n=N, t=None, h=H)
  want = akv.attend(q, ckv, implementation="reference")
  np.testing.assert_allclose(akv.attend(q, paged, implementation="reference"), want, rtol=1e-5, atol=1e-5)
  if page >= 16:  # the kernel reads pages of at least 16 slots (its smallest dot)
    tol = testing.kernel_tolerance(paged)
    np.testing.assert_allclose(akv.attend(q, paged, implementation="pallas", interpret=INTERPRET), want,
                               rtol=tol, atol=tol)
  back = paging.to_dense(paged)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(ckv)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Decoding continues on the paged cache exactly as on the dense one. append donates its cache, and the two
  # forms share their unchanged leaves, so decode on a copy.
  paged = jax.tree_util.tree_map(jnp.copy, paged)
  kv = testing.random_kv(5, b=B, k=K, s=4, h=H, dtype=jnp.bfloat16)
  for t in range(3):
    kt, vt = kv.k[:, :, t], kv.v[:, :, t]
    ckv, paged = akv.append(ckv, kt, vt, pol), akv.append(paged, kt, vt, pol)
  np.testing.assert_allclose(akv.attend(q, paged, implementation="reference"), akv.attend(q, ckv, implementation="reference"),
                             rtol=1e-5, atol=1e-5)


def test_to_dense_of_an_adakv_pool():
  ckv, _ = cache("hybrid_12x", steps=3)
  assert ckv.paged
  dense = paging.to_dense(ckv)
  assert not dense.paged and dense.body_pos.shape[1] == K
  q = testing.random_queries(3, b=B, n=N, t=None, h=H)
  np.testing.assert_allclose(akv.attend(q, dense, implementation="reference"), akv.attend(q, ckv, implementation="reference"),
                             rtol=1e-5, atol=1e-5)
  tol = testing.kernel_tolerance(dense)
  np.testing.assert_allclose(akv.attend(q, dense, implementation="pallas", interpret=INTERPRET),
                             akv.attend(q, ckv, implementation="reference"), rtol=tol, atol=tol)
  # Slots of pages a head did not own are marked empty.
  owned = np.repeat(np.asarray(ckv.page_table) >= 0, ckv.page_size, axis=-1)
  assert np.all(np.asarray(dense.body_pos)[~owned] == -1)


def test_errors():
  ckv, _ = cache("kivi2")
  with pytest.raises(ValueError, match="page_size=40 must divide the body capacity M="):
    paging.to_paged(ckv, 40)
  with pytest.raises(ValueError, match="page_size=16 must be a multiple of the key group 32"):
    paging.to_paged(ckv, 16)
  with pytest.raises(ValueError, match="to_dense: the cache is not paged"):
    paging.to_dense(ckv)
  with pytest.raises(ValueError, match="to_paged: the cache is already paged"):
    paging.to_paged(paging.to_paged(ckv, 32), 32)
