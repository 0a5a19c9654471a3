"""Tests of pallas_kernels.prefill_scores: kernel vs reference, vs akv_jax's own scoring, CUDA lowering, errors.

Axis legend: B batch, T query length (= key length), N query heads, K kv heads, G = N / K, H head dim,
W observation window.

On a machine without a GPU the kernels run in the Pallas interpreter (numerics) and are cross-lowered to Triton
IR for CUDA (what a GPU would compile); on a GPU the same tests run the compiled kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from akv_jax.cache import DenseKV
from akv_jax.models.llama import _causal_attn
from akv_jax.testing import last_queries
from akv_jax.selection import h2o_scores, snapkv_scores
from pallas_kernels import lowering
from pallas_kernels.prefill_scores import prefill_attention, prefill_attention_reference

INTERPRET = jax.default_backend() != "gpu"
TRITON_CALL = "__gpu$xla.gpu.triton"

# One fixed draw size, sliced per shape: eager jax.random compiles once per shape, about a second each on a
# 2-core CPU, which would dominate this file's runtime.
_DRAW = 1 << 19


@functools.cache
def _draw(seed: int, i: int) -> np.ndarray:
  return np.asarray(jax.random.normal(jax.random.split(jax.random.key(seed), 4)[i], (_DRAW,), jnp.float32))


def _normal(seed: int, i: int, shape, scale: float = 1.0) -> jax.Array:
  return jnp.asarray(scale * _draw(seed, i)[:math.prod(shape)].reshape(shape))


def _inputs(seed, b, t, n, kh, h, dtype, lengths, *, poison=True):
  """q [B, T, N, H], k, v [B, T, K, H] in dtype and lengths i32[B]; with poison, NaN at every padding token.

  Keys are scaled by 2 so softmaxes are peaked and a wrong mask or group moves the result a lot.
  """
  q = _normal(seed, 0, (b, t, n, h))
  k = _normal(seed, 1, (b, t, kh, h), 2.0)
  v = _normal(seed, 2, (b, t, kh, h))
  lengths = jnp.asarray(lengths, jnp.int32)
  if poison:
    pad = (jnp.arange(t)[None, :] >= lengths[:, None])[:, :, None, None]
    q, k, v = (jnp.where(pad, jnp.nan, x) for x in (q, k, v))
  return q.astype(dtype), k.astype(dtype), v.astype(dtype), lengths


def _tol(dtype):
  # o is rounded to bf16 and p is cast to bf16 for the p @ v dot; the scores stay f32 end to end (bf16 products
  # are exact in f32), so they keep a tight tolerance for both dtypes.
  o_tol = dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  return o_tol, dict(rtol=1e-5, atol=1e-5) if dtype == jnp.float32 else dict(rtol=1e-4, atol=1e-4)


# (seed, B, T, N, K, H, dtype, lengths, window, h2o, block_q, block_k): T never a multiple of the blocks, ragged
# lengths with a full row, rows shorter than the window, G in {1, 4, 8}.
CASES = [
    (1, 2, 100, 2, 2, 64, jnp.float32, [100, 37], 16, True, 32, 16),
    (2, 2, 157, 4, 1, 128, jnp.bfloat16, [157, 9], 32, False, 64, 64),
    (3, 2, 100, 16, 2, 64, jnp.bfloat16, [63, 100], 0, True, 16, 32),
    (4, 2, 48, 8, 1, 32, jnp.float32, [48, 5], 16, False, 16, 16),
    (5, 2, 157, 8, 2, 128, jnp.float32, [150, 157], 0, False, 32, 64),
    (6, 1, 100, 4, 1, 64, jnp.float32, [70], 32, True, 64, 32),
    (7, 2, 157, 8, 2, 128, jnp.bfloat16, [20, 157], 16, True, 32, 32),
]


@pytest.mark.parametrize("seed,b,t,n,kh,h,dtype,lengths,window,h2o,block_q,block_k", CASES)
def test_kernel_matches_reference(seed, b, t, n, kh, h, dtype, lengths, window, h2o, block_q, block_k):
  q, k, v, lens = _inputs(seed, b, t, n, kh, h, dtype, lengths)
  got = prefill_attention(q, k, v, lens, window=window, h2o=h2o, block_q=block_q, block_k=block_k,
                          interpret=INTERPRET)
  want = prefill_attention_reference(q, k, v, lens, window=window, h2o=h2o)
  o_tol, s_tol = _tol(dtype)
  row_pad = np.arange(t)[None, :] >= np.asarray(lengths)[:, None]  # [B, T]

  o, o_ref = np.asarray(got[0].astype(jnp.float32)), np.asarray(want[0].astype(jnp.float32))
  assert got[0].shape == q.shape and got[0].dtype == q.dtype
  # Every element compared (the reference is 0 at padding rows), so an unwritten or NaN element fails.
  np.testing.assert_allclose(o, o_ref, **o_tol)
  assert np.all(o[row_pad] == 0.0)

  for name, s, s_ref, wanted in (("window", got[1], want[1], window > 0), ("h2o", got[2], want[2], h2o)):
    if not wanted:
      assert s is None and s_ref is None, name
      continue
    assert s.shape == (b, kh, t) and s.dtype == jnp.float32, name
    s = np.asarray(s)
    np.testing.assert_allclose(s, np.asarray(s_ref), err_msg=name, **s_tol)
    assert np.all(s.transpose(0, 2, 1)[row_pad] == 0.0), name


def test_window_scores_sum_to_window_votes():
  # Each valid window query spreads probability 1 over its keys: per row the scores sum to min(W, length).
  lengths, w = [100, 11], 16
  q, k, v, lens = _inputs(8, 2, 100, 4, 2, 64, jnp.float32, lengths)
  _, win, h2o = prefill_attention(q, k, v, lens, window=w, h2o=True, block_q=32, block_k=32, interpret=INTERPRET)
  np.testing.assert_allclose(np.asarray(win).sum(-1), np.minimum(w, lengths)[:, None] * np.ones((1, 2)), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(h2o).sum(-1), np.asarray(lengths)[:, None] * np.ones((1, 2)), rtol=1e-5)


def test_matches_akv_jax_scoring():
  """window/h2o scores equal akv_jax's snapkv_scores / h2o_scores, and o equals the model's _causal_attn."""
  b, t, n, kh, h, w = 2, 100, 8, 2, 64, 32
  lengths = [100, 23]  # the second row is shorter than the window
  q, k, v, lens = _inputs(9, b, t, n, kh, h, jnp.float32, lengths, poison=False)
  o, win, h2o = prefill_attention(q, k, v, lens, window=w, h2o=True, block_q=32, block_k=16, interpret=INTERPRET)

  kv = DenseKV(k=k.transpose(0, 2, 1, 3), v=v.transpose(0, 2, 1, 3), lengths=lens)
  valid = np.arange(t)[None, :] < np.asarray(lengths)[:, None]  # [B, T]
  valid_slots = np.broadcast_to(valid[:, None, :], (b, kh, t))

  q_obs = last_queries(q.transpose(0, 2, 1, 3), lens, w)   # [B, N, W, H]
  want_win = snapkv_scores(q_obs, kv, window=w, kernel_size=1, reduce="sum")
  np.testing.assert_allclose(np.asarray(win)[valid_slots], np.asarray(want_win)[valid_slots], rtol=1e-5, atol=1e-6)

  pos = jnp.where(jnp.arange(t)[None, :] < lens[:, None], jnp.arange(t)[None, :], -1)
  want_h2o = h2o_scores(q.transpose(0, 2, 1, 3), kv, query_positions=pos)
  np.testing.assert_allclose(np.asarray(h2o)[valid_slots], np.asarray(want_h2o)[valid_slots], rtol=1e-5, atol=1e-6)

  # On a GPU the model's einsums run at f32 only because tests/conftest.py pins the matmul precision (at JAX's
  # default they were 2e-3 off on an H200).
  want_o = _causal_attn(0, q, k, v, lens)[0]
  np.testing.assert_allclose(np.asarray(o)[valid], np.asarray(want_o)[valid], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h", [64, 128])
@pytest.mark.parametrize("window,h2o", [(0, False), (16, False), (0, True), (32, True)])
def test_lowers_to_triton_for_cuda(h, window, h2o):
  # Builds the Triton IR on the CPU: unsupported primitives, non-power-of-2 arrays, bad dots and ill-typed loops
  # raise here.
  b, t, n, kh = 2, 100, 8, 2
  args = (jax.ShapeDtypeStruct((b, t, n, h), jnp.bfloat16), jax.ShapeDtypeStruct((b, t, kh, h), jnp.bfloat16),
          jax.ShapeDtypeStruct((b, t, kh, h), jnp.bfloat16), jax.ShapeDtypeStruct((b,), jnp.int32))
  f = functools.partial(prefill_attention, window=window, h2o=h2o)
  text = lowering.lower_for_cuda(f, *args)   # also runs the MLIR verifier on each Triton module
  # The attention pass, plus the scores pass when scores are asked for.
  assert text.count(TRITON_CALL) == (2 if window or h2o else 1)


def _arrays(b=1, t=32, n=4, kh=2, h=16, dtype=jnp.float32):
  q = jnp.zeros((b, t, n, h), dtype)
  kv = jnp.zeros((b, t, kh, h), dtype)
  return q, kv, kv, jnp.full((b,), t, jnp.int32)


_OK = _arrays()


@pytest.mark.parametrize("args,kwargs,match", [
    ((_OK[0][0], *_OK[1:]), {}, r"q must be \[B, T, N, H\], got shape \(32, 4, 16\)"),
    ((_OK[0], _OK[1][0], *_OK[2:]), {}, r"k must be \[B, T, K, H\], got shape \(32, 2, 16\)"),
    ((_OK[0], _OK[1], _OK[2][:, :16], _OK[3]), {}, r"v shape \(1, 16, 2, 16\) differs from k shape"),
    ((_OK[0], _OK[1][:, :16], _OK[2][:, :16], _OK[3]), {}, r"k shape \(1, 16, 2, 16\) does not match q shape"),
    ((jnp.zeros((1, 32, 3, 16)), *_OK[1:]), {}, r"N=3 query heads, not a multiple of K=2"),
    (_arrays(h=48), {}, r"head dim H=48 must be a power of 2"),
    (_arrays(h=8), {}, r"head dim H=8 must be a power of 2 >= 16"),
    ((_OK[0].astype(jnp.bfloat16), *_OK[1:]), {}, r"dtypes bfloat16, float32, float32 must match"),
    ((*_OK[:3], jnp.zeros((2,), jnp.int32)), {}, r"lengths must be i32\[B\] = \(1,\), got shape \(2,\)"),
    (_OK, dict(window=-1), r"window=-1 must be in \[0, T=32\]"),
    (_OK, dict(window=33), r"window=33 must be in \[0, T=32\]"),
    (_OK, dict(block_q=48), r"block_q=48 must be a power of 2 >= 16"),
    (_OK, dict(block_k=8), r"block_k=8 must be a power of 2 >= 16"),
    (_OK, dict(num_warps=3), r"num_warps=3 must be a power of 2"),
    (_OK, dict(num_stages=0), r"num_stages=0 must be >= 1"),
])
def test_static_errors(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    prefill_attention(*args, interpret=True, **kwargs)


def test_reference_validates_too():
  with pytest.raises(ValueError, match=r"window=33 must be in \[0, T=32\]"):
    prefill_attention_reference(*_OK, window=33)
