"""Tests of akv_jax.selection: scores against plain-numpy references, padding, GQA, budgets and every error path.

Axis legend: B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim,
W observation window.
"""

from __future__ import annotations

import functools
import math

import chex
import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from akv_jax.cache import DenseKV
from akv_jax.selection import (adakv_head_budgets, h2o_scores, h2o_scores_from_votes, knorm_scores,
                               pyramid_budgets, snapkv_scores, snapkv_scores_from_votes, streaming_scores,
                               tova_scores, uniform_budgets)

B, K, G, S, H, W = 2, 2, 3, 24, 8, 6
N = K * G


N_STREAMS, STREAM_LEN = 64, 1 << 17


@functools.cache
def _streams() -> np.ndarray:
  # One draw of independent seeded streams, sliced per test: on a 2-core CPU, compiling threefry for every new
  # shape costs about a second each, which would dominate this file's runtime.
  keys = jax.random.split(jax.random.key(0), N_STREAMS)
  return np.asarray(jax.vmap(lambda k: jax.random.normal(k, (STREAM_LEN,), jnp.float32))(keys))


def _normal(seed: int, shape, scale: float = 1.0) -> jax.Array:
  """Standard normal f32 data of `shape` from seeded stream `seed` (independent streams for different seeds)."""
  size = math.prod(shape)
  assert size <= STREAM_LEN and 0 <= seed < N_STREAMS, (seed, shape)
  return jnp.asarray(scale * _streams()[seed, :size].reshape(shape))


def _kv(seed: int, lengths, *, b=B, kh=K, s=S, h=H, positions=None) -> DenseKV:
  # Scale 2 gives peaked softmaxes, so a wrong mask or group shows up as a large error. Seeds are used in
  # pairs (k from `seed`, v from the last stream counted down), so they never collide with query seeds.
  k = _normal(seed, (b, kh, s, h), 2.0)
  v = _normal(N_STREAMS - 1 - seed, (b, kh, s, h))
  return DenseKV(k=k, v=v, lengths=jnp.asarray(lengths, jnp.int32), positions=positions)


def _with_garbage_padding(kv: DenseKV, seed: int, fill: float | None = None) -> DenseKV:
  """Same cache with padded K/V replaced by huge values (or `fill`, e.g. NaN)."""
  valid = kv.valid()[..., None]
  junk = _normal(seed, kv.k.shape, 1e4) if fill is None else jnp.full(kv.k.shape, fill, jnp.float32)
  return DenseKV(k=jnp.where(valid, kv.k, junk), v=jnp.where(valid, kv.v, -junk), lengths=kv.lengths,
                 positions=kv.positions)


# ----------------------------------------------------------------------------------------------- numpy references


def _np_head_lengths(kv: DenseKV) -> np.ndarray:
  return np.asarray(kv.head_lengths())


def _np_probs(q: np.ndarray, k: np.ndarray, length: int, q_pos, k_pos) -> np.ndarray:
  """[T, S] softmax attention of q: [T, H] over the first `length` keys of k: [S, H], f64, causal if q_pos."""
  t, s = q.shape[0], k.shape[0]
  logits = q.astype(np.float64) @ k.astype(np.float64).T / math.sqrt(q.shape[1])
  out = np.zeros((t, s))
  for i in range(t):
    seen = [j for j in range(length) if q_pos is None or (q_pos[i] >= 0 and k_pos[j] <= q_pos[i])]
    if seen:
      e = np.exp(logits[i, seen] - logits[i, seen].max())
      out[i, seen] = e / e.sum()
  return out


def _np_per_query_head(q: np.ndarray, kv: DenseKV, q_pos_fn) -> np.ndarray:
  """[B, N, S] attention summed over T for each query head separately; q: [B, N, T, H]."""
  k = np.asarray(kv.k)
  kpos = np.asarray(kv.token_positions())
  lens = _np_head_lengths(kv)
  b, n, _, _ = q.shape
  g = n // k.shape[1]
  out = np.zeros((b, n, k.shape[2]))
  for bi in range(b):
    for ni in range(n):
      hk = ni // g
      q_pos = q_pos_fn(bi, hk)
      out[bi, ni] = _np_probs(q[bi, ni], k[bi, hk], lens[bi, hk], q_pos, kpos[bi, hk]).sum(0)
  return out


def _np_group_mean(per_head: np.ndarray, kh: int) -> np.ndarray:
  b, n, s = per_head.shape
  return per_head.reshape(b, kh, n // kh, s).mean(2)


def _np_pool(x: np.ndarray, length: int, kernel: int, pooling: str) -> np.ndarray:
  out = np.full_like(x, -np.inf)
  r = kernel // 2
  for j in range(length):
    nb = x[max(0, j - r):min(length, j + r + 1)]
    out[j] = nb.max() if pooling == "max" else nb.mean()
  return out


def _np_snapkv(q_obs, kv, *, kernel_size, pooling, reduce) -> np.ndarray:
  q = np.asarray(q_obs)
  w = q.shape[2]
  lens = _np_head_lengths(kv)
  per_head = _np_per_query_head(q, kv, lambda bi, hk: lens[bi, hk] - w + np.arange(w))
  if reduce == "mean":
    per_head = per_head / w
  grouped = _np_group_mean(per_head, kv.k.shape[1])
  out = np.full_like(grouped, -np.inf)
  for bi in range(grouped.shape[0]):
    for hk in range(grouped.shape[1]):
      out[bi, hk] = _np_pool(grouped[bi, hk], lens[bi, hk], kernel_size, pooling)
  return out


def _np_mask(x: np.ndarray, kv: DenseKV) -> np.ndarray:
  return np.where(np.asarray(kv.valid()), x, -np.inf)


def _np_h2o(queries, kv, query_positions=None) -> np.ndarray:
  q = np.asarray(queries)
  t = q.shape[2]
  lens = _np_head_lengths(kv)
  if query_positions is None:
    pos_fn = lambda bi, hk: lens[bi, hk] - t + np.arange(t)
  else:
    qp = np.asarray(query_positions)
    pos_fn = lambda bi, hk: qp[bi]
  return _np_mask(_np_group_mean(_np_per_query_head(q, kv, pos_fn), kv.k.shape[1]), kv)


def _np_tova(q_last, kv) -> np.ndarray:
  q = np.asarray(q_last)[:, :, None, :]
  return _np_mask(_np_group_mean(_np_per_query_head(q, kv, lambda bi, hk: None), kv.k.shape[1]), kv)


def _assert_scores_close(got, want, tol=1e-5):
  got = np.asarray(got)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
  fin = np.isfinite(want)
  np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol)


# All five scores on one cache, so the shared properties are tested once per function.
def _all_scores(kv: DenseKV, seed: int = 7) -> dict[str, jax.Array]:
  b, kh, s, h = kv.shape
  t = s
  return {
      "streaming": streaming_scores(kv, n_sink=2),
      "snapkv": snapkv_scores(_normal(seed, (b, kh * G, W, h)), kv, window=W, kernel_size=5),
      "h2o": h2o_scores(_normal(seed + 1, (b, kh * G, t, h)), kv, chunk=5),
      "tova": tova_scores(_normal(seed + 2, (b, kh * G, h)), kv),
      "knorm": knorm_scores(kv),
  }


# ------------------------------------------------------------------------------------------------------ scores


def test_every_score_is_one_f32_per_kv_head():
  kv = _kv(0, [S, 17])
  for name, sc in _all_scores(kv).items():
    assert sc.shape == (B, K, S), name
    assert sc.dtype == jnp.float32, name


@pytest.mark.parametrize("pooling", ["max", "avg"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
@pytest.mark.parametrize("kernel_size", [1, 5])
def test_snapkv_matches_numpy_reference(pooling, reduce, kernel_size):
  kv = _kv(1, [S, 15])
  q_obs = _normal(2, (B, N, W, H))
  got = snapkv_scores(q_obs, kv, window=W, kernel_size=kernel_size, pooling=pooling, reduce=reduce)
  want = _np_snapkv(q_obs, kv, kernel_size=kernel_size, pooling=pooling, reduce=reduce)
  _assert_scores_close(got, want)


def test_snapkv_row_shorter_than_window_and_per_head_lengths():
  # Row 1 head 0 holds 3 tokens < W: its first window queries sit in negative slots and see nothing.
  kv = _kv(3, [[S, 11], [3, 9]])
  q_obs = _normal(4, (B, N, W, H))
  got = snapkv_scores(q_obs, kv, window=W, kernel_size=3, pooling="avg", reduce="sum")
  _assert_scores_close(got, _np_snapkv(q_obs, kv, kernel_size=3, pooling="avg", reduce="sum"))


@pytest.mark.parametrize("pooling", ["max", "avg"])
def test_snapkv_sum_is_window_times_mean(pooling):
  kv = _kv(5, [S, 13])
  q_obs = _normal(6, (B, N, W, H))
  kw = dict(window=W, kernel_size=7, pooling=pooling)
  total = snapkv_scores(q_obs, kv, reduce="sum", **kw)
  mean = snapkv_scores(q_obs, kv, reduce="mean", **kw)
  valid = np.asarray(kv.valid())
  np.testing.assert_allclose(np.asarray(total)[valid], W * np.asarray(mean)[valid], rtol=1e-6)
  assert np.all(np.isneginf(np.asarray(total)[~valid]))


def test_gqa_equals_mean_of_independent_query_head_scores():
  kv = _kv(7, [S, 16])
  lens = _np_head_lengths(kv)
  q = np.asarray(_normal(8, (B, N, W, H)))
  per_head = _np_per_query_head(q, kv, lambda bi, hk: lens[bi, hk] - W + np.arange(W))
  want = _np_mask(per_head.reshape(B, K, G, S).mean(2), kv)
  # kernel 1 and "sum" leave exactly the group mean of the per-query-head attention sums.
  got = snapkv_scores(jnp.asarray(q), kv, window=W, kernel_size=1, reduce="sum")
  _assert_scores_close(got, want)
  got_h2o = h2o_scores(jnp.asarray(q), kv)
  _assert_scores_close(got_h2o, want)
  q_last = q[:, :, -1, :]
  per_head_last = _np_per_query_head(q_last[:, :, None, :], kv, lambda bi, hk: None)
  _assert_scores_close(tova_scores(jnp.asarray(q_last), kv),
                       _np_mask(per_head_last.reshape(B, K, G, S).mean(2), kv))


@pytest.mark.parametrize("fill", [None, float("nan")])
def test_padding_scores_neg_inf_and_never_pollutes(fill):
  kv = _kv(9, [[S, 10], [14, 5]])
  valid = np.asarray(kv.valid())
  clean = _all_scores(kv)
  dirty = _all_scores(_with_garbage_padding(kv, 10, fill))
  for name in clean:
    c, d = np.asarray(clean[name]), np.asarray(dirty[name])
    assert np.all(np.isneginf(c[~valid])), name
    assert np.all(np.isfinite(c[valid])), name
    np.testing.assert_array_equal(c, d, err_msg=name)


def test_padded_window_queries_do_not_matter():
  kv = _kv(11, [S, 4])  # row 1 is shorter than W = 6: two window queries are padding
  q_obs = _normal(12, (B, N, W, H))
  q_junk = q_obs.at[1, :, :W - 4].set(jnp.nan)
  np.testing.assert_array_equal(snapkv_scores(q_obs, kv, window=W), snapkv_scores(q_junk, kv, window=W))


def test_ragged_batch_equals_each_row_alone():
  lengths = [S, 13]
  kv = _kv(13, lengths)
  q_obs = _normal(14, (B, N, W, H))
  queries = _normal(15, (B, N, S, H))
  q_last = _normal(16, (B, N, H))

  def run(kv_, rows):
    return {
        "snapkv": snapkv_scores(q_obs[rows], kv_, window=W, kernel_size=5, pooling="avg"),
        "h2o": h2o_scores(queries[rows], kv_, chunk=4),
        "tova": tova_scores(q_last[rows], kv_),
        "knorm": knorm_scores(kv_),
        "streaming": streaming_scores(kv_),
    }

  batched = run(kv, slice(None))
  for b, length in enumerate(lengths):
    alone_kv = DenseKV(k=kv.k[b:b + 1, :, :length], v=kv.v[b:b + 1, :, :length],
                       lengths=kv.lengths[b:b + 1])
    alone = run(alone_kv, slice(b, b + 1))
    for name in batched:
      np.testing.assert_allclose(np.asarray(batched[name])[b, :, :length], np.asarray(alone[name])[0],
                                 rtol=1e-6, atol=1e-7, err_msg=name)


def test_h2o_chunking_does_not_change_scores_and_matches_numpy():
  kv = _kv(17, [S, 9])
  t = 20  # not a multiple of 7, longer than row 1: its first 11 queries are padding
  queries = _normal(18, (B, N, t, H))
  small = h2o_scores(queries, kv, chunk=7)
  big = h2o_scores(queries, kv, chunk=1024)
  np.testing.assert_allclose(np.asarray(small), np.asarray(big), rtol=1e-6, atol=1e-7)
  _assert_scores_close(big, _np_h2o(queries, kv))


def test_h2o_explicit_query_positions_with_padding_queries():
  kv = _kv(19, [S, 12])
  t = 8
  queries = _normal(20, (B, N, t, H))
  # Row 0: a right-padded prompt of 5 queries (3 padding slots). Row 1: scattered positions.
  qp = jnp.asarray([[0, 1, 2, 3, 4, -1, -1, -1], [2, 3, 5, 7, 8, 9, 10, 11]], jnp.int32)
  got = h2o_scores(queries, kv, query_positions=qp, chunk=3)
  _assert_scores_close(got, _np_h2o(queries, kv, qp))
  # Row 0's padding queries contribute nothing, and keys beyond position 4 are never attended.
  got_trim = h2o_scores(queries[:, :, :5], kv, query_positions=qp[:, :5], chunk=3)
  np.testing.assert_allclose(np.asarray(got)[0], np.asarray(got_trim)[0], rtol=1e-6, atol=1e-7)
  assert np.all(np.asarray(got)[0, :, 5:S] == 0)


def test_h2o_peak_memory_is_per_chunk():
  s = 1024
  kv = _kv(21, [s, s], s=s, kh=1)
  queries = _normal(22, (B, 4, s, H))
  full_matrix = B * 4 * s * s * 4
  compiled = jax.jit(functools.partial(h2o_scores, chunk=32)).lower(queries, kv).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    pytest.skip("this backend reports no memory analysis")
  assert analysis.temp_size_in_bytes < full_matrix / 4


def test_tova_matches_numpy():
  kv = _kv(23, [[S, 7], [19, 1]])
  q_last = _normal(24, (B, N, H))
  _assert_scores_close(tova_scores(q_last, kv), _np_tova(q_last, kv))


def test_knorm_matches_numpy_in_f32_from_bf16():
  kv = _kv(25, [S, 6])
  kv = DenseKV(k=kv.k.astype(jnp.bfloat16), v=kv.v.astype(jnp.bfloat16), lengths=kv.lengths)
  k = np.asarray(kv.k.astype(jnp.float32), np.float64)
  _assert_scores_close(knorm_scores(kv), _np_mask(-np.linalg.norm(k, axis=-1), kv))


def test_streaming_sinks_then_recency_by_original_position():
  positions = jnp.broadcast_to(jnp.asarray([0, 1, 2, 3, 4, 40, 41, 42, 43, 44], jnp.int32), (B, K, 10))
  kv = _kv(26, [10, 6], s=10, positions=positions)
  got = np.asarray(streaming_scores(kv, n_sink=4))
  want = np.where(np.asarray(positions) < 4, 1e30, np.asarray(positions)).astype(np.float32)
  _assert_scores_close(got, _np_mask(want, kv), tol=0)
  assert np.all(got[1, :, :6] == np.asarray([1e30] * 4 + [4, 40], np.float32))


def test_scores_do_not_retrace_for_new_lengths():
  @jax.jit
  @chex.assert_max_traces(n=1)
  def all_scores(kv, q_obs, queries, q_last):
    return (snapkv_scores(q_obs, kv, window=W), h2o_scores(queries, kv, chunk=8), tova_scores(q_last, kv),
            knorm_scores(kv), streaming_scores(kv))

  q_obs, queries, q_last = _normal(27, (B, N, W, H)), _normal(28, (B, N, S, H)), _normal(29, (B, N, H))
  for lengths in ([S, 9], [7, 20], [[S, 3], [12, 12]]):
    kv = _kv(30, jnp.broadcast_to(jnp.asarray(lengths, jnp.int32).reshape(B, -1), (B, K)))
    jax.block_until_ready(all_scores(kv, q_obs, queries, q_last))


def _bad_kv_rank():
  kv = _kv(0, [S, S])
  return DenseKV(k=kv.k[0], v=kv.v[0], lengths=kv.lengths)


def _bad_kv_v():
  kv = _kv(0, [S, S])
  return DenseKV(k=kv.k, v=kv.v[..., :4], lengths=kv.lengths)


_KV = _kv(0, [S, S])
_Q_OBS = _normal(1, (B, N, W, H))

SCORE_ERRORS = [
    (lambda: knorm_scores(_bad_kv_rank()), r"kv.k must be \[B, K, S, H\]"),
    (lambda: knorm_scores(_bad_kv_v()), r"kv.v shape .* differs from kv.k shape"),
    (lambda: streaming_scores(_KV, n_sink=-1), r"n_sink must be >= 0, got -1"),
    (lambda: snapkv_scores(_Q_OBS[0], _KV, window=W), r"q_obs must be \[B, N, T, H\]"),
    (lambda: snapkv_scores(_Q_OBS[:1], _KV, window=W), r"q_obs batch 1 differs from the cache batch 2"),
    (lambda: snapkv_scores(_Q_OBS[..., :4], _KV, window=W), r"q_obs head dim 4 differs from the cache head dim 8"),
    (lambda: snapkv_scores(_Q_OBS[:, :5], _KV, window=W), r"N=5 query heads, not a multiple of K=2"),
    (lambda: snapkv_scores(_Q_OBS[:, :, :0], _KV, window=0), r"window must be >= 1, got 0"),
    (lambda: snapkv_scores(_Q_OBS, _KV, window=32), r"window=32 differs from q_obs window length 6"),
    (lambda: snapkv_scores(_normal(1, (B, N, 30, H)), _KV, window=30), r"window=30 exceeds the cache length S=24"),
    (lambda: snapkv_scores(_Q_OBS, _KV, window=W, kernel_size=4), r"kernel_size must be odd and >= 1, got 4"),
    (lambda: snapkv_scores(_Q_OBS, _KV, window=W, kernel_size=0), r"kernel_size must be odd and >= 1, got 0"),
    (lambda: snapkv_scores(_Q_OBS, _KV, window=W, pooling="min"), r"unknown pooling 'min'"),
    (lambda: snapkv_scores(_Q_OBS, _KV, window=W, reduce="max"), r"unknown reduce 'max'"),
    (lambda: h2o_scores(_Q_OBS, _KV, chunk=0), r"chunk must be >= 1, got 0"),
    (lambda: h2o_scores(_Q_OBS, _KV, query_positions=jnp.zeros((B, 5), jnp.int32)),
     r"query_positions must be \[B, T\] = \(2, 6\), got shape \(2, 5\)"),
    (lambda: tova_scores(_Q_OBS, _KV), r"q_last must be \[B, N, H\]"),
    (lambda: tova_scores(_normal(1, (B, N, 5)), _KV), r"q_last head dim 5 differs from the cache head dim 8"),
    (lambda: snapkv_scores_from_votes(jnp.zeros((B, K, S - 1)), _KV, window=W),
     r"votes must be \[B, K, S\] = \(2, 2, 24\) to match the cache, got shape \(2, 2, 23\)"),
    (lambda: snapkv_scores_from_votes(jnp.zeros((B, K, S)), _KV, window=30), r"window=30 exceeds the cache length"),
    (lambda: snapkv_scores_from_votes(jnp.zeros((B, K, S)), _KV, window=W, pooling="min"), r"unknown pooling"),
    (lambda: h2o_scores_from_votes(jnp.zeros((B, S)), _KV), r"votes must be \[B, K, S\] = \(2, 2, 24\)"),
]


@pytest.mark.parametrize("call,match", SCORE_ERRORS, ids=[m for _, m in SCORE_ERRORS])
def test_score_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ----------------------------------------------------------------------------------------------------- budgets


def test_uniform_budgets():
  assert uniform_budgets(64, 3) == (64, 64, 64)


def test_pyramid_budgets_funnel():
  avg, window, layers = 160, 32, 32
  got = pyramid_budgets(avg, layers, window=window)
  assert len(got) == layers and all(isinstance(x, int) for x in got)
  assert all(a > b for a, b in zip(got, got[1:]))
  b = avg - window
  assert got[0] == 2 * b - b // 20
  assert got[-1] >= b // 20
  # The integer step keeps the mean at or a little above B (by at most (L - 1) / 2).
  assert b <= sum(got) / layers <= b + (layers - 1) / 2


def test_pyramid_budgets_exact_small_case():
  # B = 100, min = 5, max = 195, step = 190 // 3 = 63.
  assert pyramid_budgets(108, 4, window=8) == (195, 132, 69, 6)
  assert pyramid_budgets(108, 4, window=8, beta=10) == (190, 130, 70, 10)


def test_pyramid_budgets_single_layer_and_empty_budget():
  assert pyramid_budgets(96, 1, window=32) == (64,)
  assert pyramid_budgets(32, 5, window=32) == (0,) * 5


BUDGET_ERRORS = [
    (lambda: uniform_budgets(8, 0), r"num_layers must be >= 1, got 0"),
    (lambda: uniform_budgets(-1, 2), r"avg must be >= 0, got -1"),
    (lambda: pyramid_budgets(64, 0, window=8), r"num_layers must be >= 1, got 0"),
    (lambda: pyramid_budgets(64, 4, window=-1), r"window must be >= 0, got -1"),
    (lambda: pyramid_budgets(16, 4, window=32), r"avg=16 is smaller than window=32"),
    (lambda: pyramid_budgets(64, 4, window=8, beta=0), r"beta must be > 0, got 0"),
    (lambda: adakv_head_budgets(jnp.zeros((2, 8)), 4), r"scores must be \[B, K, S\], got shape \(2, 8\)"),
    (lambda: adakv_head_budgets(jnp.zeros((1, 2, 8)), -4), r"total must be >= 0, got -4"),
    (lambda: adakv_head_budgets(jnp.zeros((1, 2, 8)), 4, granularity=0), r"granularity must be >= 1, got 0"),
    (lambda: adakv_head_budgets(jnp.zeros((1, 2, 8)), 6, granularity=4),
     r"total=6 is not a multiple of granularity=4"),
    (lambda: adakv_head_budgets(jnp.zeros((1, 2, 8)), 4, alpha=1.5), r"alpha must be in \[0, 1\], got 1.5"),
    (lambda: adakv_head_budgets(jnp.zeros((1, 2, 8)), 4, cap=-1), r"cap must be >= 0, got -1"),
    (lambda: adakv_head_budgets(jnp.zeros((1, 2, 8)), 12, cap=5, granularity=4),
     r"cap=5 \(in multiples of granularity=4\) over K=2 heads cannot hold total=12"),
    (lambda: adakv_head_budgets(jnp.zeros((1, 2, 8)), 4, available=jnp.zeros((2,), jnp.int32)),
     r"available must be \[B, K\] = \(1, 2\), got shape \(2,\)"),
]


@pytest.mark.parametrize("call,match", BUDGET_ERRORS, ids=[m for _, m in BUDGET_ERRORS])
def test_budget_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def _padded_scores(seed: int, b: int, kh: int, s: int, lengths) -> jax.Array:
  """f32[B, K, S] scores, -inf beyond `lengths` (i32[B] or i32[B, K])."""
  sc = np.asarray(_normal(seed, (b, kh, s)))
  valid = np.arange(s)[None, None, :] < np.asarray(lengths, np.int32).reshape(b, -1)[:, :, None]
  return jnp.asarray(np.where(valid, sc, -np.inf), jnp.float32)


def test_adakv_hand_example():
  # C = 4, alpha = 0.25: head 0 wins 6 of the global top 8, head 1 wins 2 -> raw 5.5 and 2.5; the tied
  # remainders go to the lower head first.
  sc = jnp.asarray([[[9, 8, 7, 6, 5, 4, 0, 0], [6.5, 5.5, 0, 0, 0, 0, 0, 0]]], jnp.float32)
  np.testing.assert_array_equal(adakv_head_budgets(sc, 8, alpha=0.25), [[6, 2]])
  np.testing.assert_array_equal(adakv_head_budgets(sc, 8, alpha=1.0), [[4, 4]])
  np.testing.assert_array_equal(adakv_head_budgets(sc, 8, alpha=0.0), [[6, 2]])


def test_adakv_batch_rows_sum_to_total_and_are_independent():
  b, kh, s, total = 3, 4, 32, 4 * 10
  sc = _padded_scores(31, b, kh, s, [32, 20, 11])
  got = np.asarray(adakv_head_budgets(sc, total))
  assert got.dtype == np.int32 and got.shape == (b, kh)
  np.testing.assert_array_equal(got.sum(1), total)
  assert np.all(got >= 0)
  for r in range(b):
    np.testing.assert_array_equal(adakv_head_budgets(sc[r:r + 1], total)[0], got[r])


def test_adakv_granularity_and_cap():
  b, kh, s = 3, 4, 32
  sc = _padded_scores(32, b, kh, s, [32, 30, 25])
  sc = sc.at[:, 0].add(100.0)  # head 0 wants everything
  got = np.asarray(adakv_head_budgets(sc, 48, granularity=4, cap=16))
  np.testing.assert_array_equal(got % 4, 0)
  np.testing.assert_array_equal(got.sum(1), 48)
  assert np.all(got <= 16)
  assert np.all(got[:, 0] == 16)


def test_adakv_dominant_head_gets_more_than_its_safeguard():
  kh, s, c, alpha = 4, 32, 8, 0.2
  sc = _padded_scores(33, 2, kh, s, [s, s]).at[:, 2].add(100.0)
  got = np.asarray(adakv_head_budgets(sc, kh * c, alpha=alpha))
  np.testing.assert_array_equal(got.sum(1), kh * c)
  # Head 2 takes all K * C global winners: (1 - alpha) * K * C + alpha * C = 27.2; the others keep alpha * C.
  # Floors 1, 1, 27, 1 leave 2 units; the 0.6 remainders tie and go to the lower heads.
  assert np.all(got[:, 2] > alpha * c)
  np.testing.assert_array_equal(got, [[2, 2, 27, 1], [2, 2, 27, 1]])


def test_adakv_available_bounds_budgets():
  sc = _padded_scores(34, 2, 3, 16, [[16, 3, 16], [2, 2, 2]])
  available = jnp.asarray([[16, 3, 16], [2, 2, 2]], jnp.int32)
  got = np.asarray(adakv_head_budgets(sc, 24, granularity=2, available=available))
  np.testing.assert_array_equal(got % 2, 0)
  assert got[0].sum() == 24 and got[0, 1] <= 4  # 3 rounded up to the granularity
  # Row 1 cannot use 24 tokens: every head gets its bound (2) and the row sums to less, never more.
  np.testing.assert_array_equal(got[1], [2, 2, 2])


def test_adakv_under_jit_matches_eager():
  sc = _padded_scores(35, 3, 4, 20, [20, 12, 7])
  fn = jax.jit(adakv_head_budgets, static_argnames=("total", "alpha", "granularity", "cap"))
  kw = dict(total=24, alpha=0.3, granularity=2, cap=10)
  np.testing.assert_array_equal(fn(sc, **kw), adakv_head_budgets(sc, **kw))


@hypothesis.settings(deadline=None, max_examples=30, derandomize=True)
@hypothesis.given(
    seed=st.integers(0, N_STREAMS - 1),
    b=st.integers(1, 3),
    kh=st.sampled_from([1, 2, 4]),
    s=st.sampled_from([4, 9, 16]),
    granularity=st.sampled_from([1, 2, 4]),
    per_head_units=st.integers(0, 4),
    alpha=st.sampled_from([0.0, 0.2, 0.5, 1.0]),
    use_cap=st.booleans(),
    data=st.data(),
)
def test_adakv_sum_invariant(seed, b, kh, s, granularity, per_head_units, alpha, use_cap, data):
  total = kh * per_head_units * granularity
  lengths = data.draw(st.lists(st.integers(0, s), min_size=b, max_size=b))
  sc = _padded_scores(seed, b, kh, s, lengths)
  cap = None
  if use_cap:
    cap = data.draw(st.integers(per_head_units * granularity, per_head_units * granularity + 2 * granularity))
  got = np.asarray(adakv_head_budgets(sc, total, alpha=alpha, granularity=granularity, cap=cap))
  assert got.shape == (b, kh)
  np.testing.assert_array_equal(got.sum(1), total)
  np.testing.assert_array_equal(got % granularity, 0)
  assert np.all(got >= 0)
  if cap is not None:
    assert np.all(got <= cap)


def _py_adakv(sc: np.ndarray, total: int, alpha: float, g: int, cap, available) -> np.ndarray:
  """Loop-by-loop AdaKV allocation: global top-k by (score desc, head, slot), then round-robin rounding."""
  b, kh, s = sc.shape
  out = np.zeros((b, kh), np.int64)
  units_total = total // g
  for r in range(b):
    cands = []
    for h in range(kh):
      slots = sorted((j for j in range(s) if sc[r, h, j] > -np.inf), key=lambda j: (-sc[r, h, j], j))
      cands += [(-sc[r, h, j], h * s + j, h) for j in slots[:cap if cap is not None else s]]
    counts = np.bincount([h for _, _, h in sorted(cands)[:total]], minlength=kh).astype(np.float32)
    raw = (counts * (np.float32(1) - np.float32(alpha)) + np.float32(alpha) * np.float32(total / kh)) / np.float32(g)
    upper = [units_total] * kh
    if cap is not None:
      upper = [min(u, cap // g) for u in upper]
    if available is not None:
      upper = [min(u, -(-max(int(a), 0) // g)) for u, a in zip(upper, available[r])]
    units = [min(max(int(np.floor(x)), 0), u) for x, u in zip(raw, upper)]
    deficit = units_total - sum(units)
    order = sorted(range(kh), key=lambda h: (-(raw[h] - np.floor(raw[h])), h))
    while deficit > 0 and any(u < up for u, up in zip(units, upper)):
      for h in order:
        if deficit and units[h] < upper[h]:
          units[h] += 1
          deficit -= 1
    out[r] = np.asarray(units) * g
  return out


@hypothesis.settings(deadline=None, max_examples=25, derandomize=True)
@hypothesis.given(
    seed=st.integers(0, N_STREAMS - 1),
    kh=st.sampled_from([1, 2, 4]),
    granularity=st.sampled_from([1, 2, 4]),
    per_head_units=st.integers(0, 5),
    # Dyadic alphas keep every float step exact, so the loop reference must agree bit for bit.
    alpha=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    data=st.data(),
)
def test_adakv_matches_loop_reference(seed, kh, granularity, per_head_units, alpha, data):
  b, s = 3, 12
  total = kh * per_head_units * granularity
  lengths = data.draw(st.lists(st.lists(st.integers(0, s), min_size=kh, max_size=kh), min_size=b, max_size=b))
  sc = np.asarray(_padded_scores(seed, b, kh, s, lengths))
  # Coarse scores force ties across heads and slots, exercising every tie-break.
  sc = np.where(np.isfinite(sc), np.round(sc), sc).astype(np.float32)
  cap = data.draw(st.one_of(st.none(), st.integers(per_head_units * granularity, s)))
  available = data.draw(st.one_of(st.none(), st.just(np.asarray(lengths, np.int32))))
  got = adakv_head_budgets(jnp.asarray(sc), total, alpha=alpha, granularity=granularity, cap=cap,
                           available=None if available is None else jnp.asarray(available))
  np.testing.assert_array_equal(got, _py_adakv(sc, total, alpha, granularity, cap, available))


@pytest.mark.parametrize("kernel_size,pooling,reduce", [(7, "max", "mean"), (5, "avg", "sum"), (1, "max", "sum")])
def test_scores_from_votes_equal_scores_from_queries(kernel_size, pooling, reduce):
  """The prefill kernel's votes (its plain-jnp reference here) give exactly SnapKV's and H2O's scores."""
  from pallas_kernels.prefill_scores import prefill_attention_reference  # noqa: PLC0415 (plain jnp)
  b, t, kh, h, w = 2, 40, K, 16, 8    # the reference shares the kernel's checks: H a power of 2 >= 16
  lengths = jnp.array([40, 6], jnp.int32)   # the second row is shorter than the window
  q = _normal(30, (b, t, N, h))
  k, v = _normal(31, (b, t, kh, h)), _normal(32, (b, t, kh, h))
  _, win, h2o = prefill_attention_reference(q, k, v, lengths, window=w, h2o=True)
  kv = DenseKV(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3), lengths=lengths)
  idx = lengths[:, None] - w + jnp.arange(w)[None, :]
  q_obs = jnp.take_along_axis(q, jnp.clip(idx, 0, t - 1)[:, :, None, None], axis=1)
  q_obs = jnp.where((idx >= 0)[:, :, None, None], q_obs, 0.0).transpose(0, 2, 1, 3)
  kw = dict(window=w, kernel_size=kernel_size, pooling=pooling, reduce=reduce)
  _assert_scores_close(snapkv_scores_from_votes(win, kv, **kw), np.asarray(snapkv_scores(q_obs, kv, **kw)))
  pos = jnp.where(jnp.arange(t)[None, :] < lengths[:, None], jnp.arange(t)[None, :], -1)
  _assert_scores_close(h2o_scores_from_votes(h2o, kv),
                       np.asarray(h2o_scores(q.transpose(0, 2, 1, 3), kv, query_positions=pos)))
