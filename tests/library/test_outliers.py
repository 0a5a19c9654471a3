"""Outlier key channels (akv_jax.outliers): a few channels per (row, kv head) held at 16 bits beside the low-bit
codes. They are chosen from the prompt, decode to exactly 0 in the codes, are read by every attention path, enter
with appended tokens, are counted in the bytes held, and cut the 2-bit error where a few channels are large."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import outliers
from akv_jax.testing import assert_attention_paths_agree, random_kv, random_queries

B, K, N, S, H = 2, 2, 4, 256, 64
PLANTED = [3, 17, 40]


def _kv(scale=10.0):
  """Random keys with three channels `scale` times wider than the rest (and shifted: a large mean too)."""
  kv = random_kv(0, b=B, k=K, s=S, h=H, lengths=(S, 181), dtype=jnp.float32)
  k = np.array(kv.k)
  k[..., PLANTED] = k[..., PLANTED] * scale + 3.0
  return dataclasses.replace(kv, k=jnp.asarray(k, jnp.bfloat16), v=kv.v.astype(jnp.bfloat16))


def _pol(name="kivi2", o=3, **kw):
  pol = akv.presets.fixed(name)
  if not pol.quantized:
    return dataclasses.replace(pol, **kw)
  pol = dataclasses.replace(pol, recent=32, key_group=16, value_group=16)
  return dataclasses.replace(pol, keys=dataclasses.replace(pol.keys, outliers=o), **kw)


@pytest.fixture(scope="module")
def kv():
  return _kv()


@pytest.fixture(scope="module")
def q_obs():
  return random_queries(1, b=B, n=N, t=32, h=H, dtype=jnp.bfloat16)


def test_choose_finds_the_wide_channels_and_weighs_them_by_the_queries(kv):
  ch = outliers.choose(kv.k, kv.valid(), 3, group=16)
  assert ch.shape == (B, K, 3) and ch.dtype == jnp.int32
  np.testing.assert_array_equal(ch, np.broadcast_to(PLANTED, (B, K, 3)))
  # Queries that never look at channel 40 make it cost nothing: the next widest channel takes its place.
  q = np.ones((B, N, 8, H), np.float32)
  q[..., 40] = 0.0
  ch = np.asarray(outliers.choose(kv.k, kv.valid(), 3, jnp.asarray(q)))
  assert 40 not in ch and {3, 17} <= set(ch[0, 0])
  # Padding does not enter the statistics: a planted channel only in row 1's padding is not chosen there.
  k = np.array(kv.k, np.float32)
  k[1, :, 181:, 60] = 1e4
  assert 60 not in np.asarray(outliers.choose(jnp.asarray(k), kv.valid(), 3, group=16))[1]
  # A channel that drifts slowly is wide over the prompt but narrow within a key group: it costs little.
  k = np.array(kv.k, np.float32)
  k[..., 50] += np.linspace(0, 200, S)
  assert np.std(k[0, 0, :, 50]) > 3 * np.std(k[0, 0, :, 3])
  np.testing.assert_array_equal(outliers.choose(jnp.asarray(k), kv.valid(), 3, group=16),
                                np.broadcast_to(PLANTED, (B, K, 3)))


def test_a_policy_without_a_scorer_asks_for_the_queries_that_rank_the_channels():
  assert _pol("kivi2", o=2).needs(4096).queries == outliers.QUERIES
  assert _pol("kivi2", o=2).needs(20).queries == 20
  assert _pol("kivi2", o=0).needs(4096).queries == 0
  assert _pol("snapkv", o=0).needs(4096) == akv.presets.fixed("snapkv").needs(4096)


def test_split_merge_round_trip_and_cut_channels_decode_to_zero(kv):
  ch = outliers.choose(kv.k, kv.valid(), 3, group=16)
  rest, held = outliers.split(kv.k, ch)
  assert held.shape == (B, K, S, 3) and held.dtype == kv.k.dtype
  np.testing.assert_array_equal(rest[..., PLANTED], 0)
  np.testing.assert_array_equal(outliers.merge(rest, held, ch), kv.k)
  qt = akv.quantize(kv.k, akv.QuantSpec(bits=2, group=16, outliers=3), channels=ch)
  assert qt.num_outliers == 3
  codes_only = akv.dequantize(dataclasses.replace(qt, outliers=None))
  np.testing.assert_array_equal(codes_only[..., PLANTED], 0.0)       # constant groups decode exactly
  full = akv.dequantize(qt, channels=ch)
  np.testing.assert_array_equal(full[..., PLANTED], np.asarray(kv.k, np.float32)[..., PLANTED])


@pytest.mark.parametrize("name", ["kivi2", "hybrid_8x", "kivi3"])
@pytest.mark.parametrize("rotation", [None, 4])
def test_every_path_reads_outlier_channels(kv, q_obs, name, rotation):
  """Reference, chunked XLA and the fused kernel (interpret) agree, per-head and paged (hybrid_8x is AdaKV),
  after appends that flush key groups through the split; the reference is dense attention over the tokens."""
  if name == "kivi3":    # the fused kernel reads 3-bit codes at H >= 128
    kvx = random_kv(2, b=B, k=K, s=S, h=128, lengths=(S, 181), dtype=jnp.bfloat16)
    qx, qo = random_queries(3, b=B, n=N, t=None, h=128), random_queries(1, b=B, n=N, t=32, h=128)
  else:
    kvx, qx, qo = kv, random_queries(3, b=B, n=N, t=None, h=H), q_obs
  pol = _pol(name, rotation=rotation)
  ckv = akv.compress(kvx, pol, queries=qo, reserve=40)
  for step in range(20):
    kt, vt = (jax.random.normal(jax.random.key(100 + step), (2, B, K, kvx.k.shape[-1])) * 0.5).astype(jnp.bfloat16)
    ckv = akv.append(ckv, kt, vt, pol)
  assert int(jnp.min(ckv.key_fill)) > 0
  assert_attention_paths_agree(qx, ckv)


def test_extend_equals_appends_with_outlier_channels(kv, q_obs):
  pol = _pol("kivi2")
  base = akv.compress(kv, pol, queries=q_obs, reserve=24)
  qt = random_queries(4, b=B, n=N, t=12, h=H)
  kt, vt = (jax.random.normal(jax.random.key(9), (2, B, K, 12, H)) * 0.5).astype(jnp.bfloat16)
  _, ext = akv.extend(qt, kt, vt, jax.tree_util.tree_map(jnp.copy, base), pol)
  app = jax.tree_util.tree_map(jnp.copy, base)
  for t in range(12):
    app = akv.append(app, kt[:, :, t], vt[:, :, t], pol)
  for a, c in zip(jax.tree_util.tree_leaves(ext), jax.tree_util.tree_leaves(app)):
    np.testing.assert_array_equal(a, c)


def test_outlier_channels_are_counted_in_the_bytes_held(kv, q_obs):
  plain = akv.compress(kv, _pol("kivi2", o=0), queries=q_obs, reserve=8)
  held = akv.compress(kv, _pol("kivi2", o=3), queries=q_obs, reserve=8)
  m = held.body_capacity
  assert akv.nbytes(held) - akv.nbytes(plain) == B * K * m * 3 * 2 + B * K * 3 * 4   # bf16 values, i32 indices
  shape = akv.ratios.CacheShape(s=S, num_layers=1, kv_heads=K, head_dim=H)
  assert akv.ratios.held_bytes(_pol("kivi2", o=3), shape) * B == akv.nbytes(
      akv.compress(kv, _pol("kivi2", o=3), queries=q_obs))


def test_outlier_channels_cut_the_two_bit_error_on_wide_channels(kv, q_obs):
  """2-bit per-channel keys: a wide channel's step is wide, and its score error follows; held at 16 bits, the
  error that remains is that of the ordinary channels (values bf16 here, so only the keys' error counts)."""
  q = random_queries(5, b=B, n=N, t=None, h=H)
  dense = akv.dense_attention(q, kv.k, kv.v, kv.lengths)
  err = {}
  for o in (0, 3):
    pol = akv.Policy(name="keys_2bit", keys=akv.QuantSpec(bits=2, group=16, outliers=o),
                     guards=akv.Guards(recent=0, n_sink=0))
    err[o] = float(jnp.linalg.norm(akv.attend(q, akv.compress(kv, pol, queries=q_obs)) - dense)
                   / jnp.linalg.norm(dense))
  assert err[3] < 0.7 * err[0], err     # 0.49 -> 0.28 of the output norm here


def test_outlier_errors(kv):
  with pytest.raises(ValueError, match="outliers=-1 must be an int >= 0"):
    akv.QuantSpec(bits=2, outliers=-1)
  with pytest.raises(ValueError, match="outliers=2 needs per-channel groups \\(axis='channel'\\), got axis='token'"):
    akv.QuantSpec(bits=2, axis="token", outliers=2)
  with pytest.raises(ValueError, match="outliers=64 outlier channels must be >= 0 and below the head dim H=64"):
    akv.compress(kv, _pol("kivi2", o=64))
  spec = akv.QuantSpec(bits=2, group=16, outliers=3)
  with pytest.raises(ValueError, match=r"outliers=3 needs x \[B, K, S, H\] and channels i32\[2, 2, 3\]; got x of "
                                       r"shape \(2, 2, 256, 64\) and channels of shape None"):
    akv.quantize(kv.k, spec)
  with pytest.raises(ValueError, match=r"channels of shape \(2, 2, 2\)"):
    akv.quantize(kv.k, spec, channels=jnp.zeros((B, K, 2), jnp.int32))
  qt = akv.quantize(kv.k, spec, channels=outliers.choose(kv.k, kv.valid(), 3))
  with pytest.raises(ValueError, match=r"this tensor holds 3 outlier channels: pass their indices, channels "
                                       r"i32\[2, 2, 3\], got None"):
    akv.dequantize(qt)
