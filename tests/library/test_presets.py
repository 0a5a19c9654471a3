"""Presets: an N-x preset is a byte target that compress meets on any shape (tests/library/test_targets.py), and its
fixed-keep form (`with_target(None)`) measures 0.97N..1.15N from the arrays it holds at S = 8192 and 32768; fitted to
another model's shape (akv.ratios), a preset measures its target there."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import akv_jax as akv
from akv_jax.testing import random_kv, random_queries

L, B, K, N, H, W = 32, 1, 8, 32, 128, 32


def _held_bytes(policy, s):
  """Bytes every layer's cache holds, from the shapes compress produces (exact: all storage is static-shaped)."""
  return akv.ratios.held_bytes(policy, akv.ratios.CacheShape(s=s, num_layers=L, kv_heads=K, head_dim=H, q_heads=N,
                                                              batch=B), window=W)


def test_shape_bytes_equal_held_bytes():
  """The eval_shape accounting used below is the same number as arrays actually materialized."""
  kv = random_kv(0, b=2, k=2, s=512, h=64, dtype=jnp.bfloat16)
  q = random_queries(1, b=2, n=8, t=32, h=64, dtype=jnp.bfloat16)
  inv_freq = jnp.ones(32)   # read only by Expected Attention
  for name in akv.presets.names():
    pol = akv.presets.get(name).with_target(None)   # the ratio presets' targets are out of reach at S = 512
    if pol.budget.pooled_layers:   # layers compressed together: tests/library/test_pooled.py
      continue
    # KVzip reads the votes of a model pass instead of queries; any votes of the right shape give its layout.
    obs = (dict(votes=jnp.abs(kv.k[..., 0]).astype(jnp.float32)) if pol.needs(512).reconstruction is not None
           else dict(queries=q))
    ckv = akv.compress(kv, pol, inv_freq=inv_freq, layer=3, num_layers=8, **obs)
    shapes = jax.eval_shape(lambda kv, obs: akv.compress(kv, pol, inv_freq=inv_freq, layer=3, num_layers=8, **obs),
                            kv, obs)
    assert akv.nbytes(ckv) == akv.nbytes(shapes)


@pytest.mark.parametrize("name, target", [("hybrid_5x", 5), ("hybrid_8x", 8), ("hybrid_12x", 12)])
@pytest.mark.parametrize("s", [8192, 32768])
def test_named_ratio(name, target, s):
  """The name is the target (which tests/library/test_targets.py checks on five shapes); the fixed keep gives
  about the named ratio on the shape it was calibrated on."""
  preset = akv.presets.get(name)
  assert preset.budget.target == target
  ratio = 2 * 2 * B * K * s * H * L / _held_bytes(preset.with_target(None), s)
  assert 0.97 * target <= ratio <= 1.15 * target, f"{name}'s fixed keep at S={s}: {ratio:.2f}x"


def test_named_ratio_out_of_reach_is_an_error():
  """A shape whose guard bands alone hold more than the name allows: an error naming the reachable ratio, and
  the fixed-keep form still compresses."""
  kv = random_kv(0, b=1, k=2, s=256, h=64, dtype=jnp.bfloat16)
  q = random_queries(1, b=1, n=4, t=32, h=64, dtype=jnp.bfloat16)
  with pytest.raises(ValueError, match=r"policy 'hybrid_8x' reaches at most 1\.\d+x on CacheShape\(s=256, "
                                       r"num_layers=4.* short of the target 8x"):
    akv.compress(kv, akv.presets.get("hybrid_8x"), queries=q, layer=1, num_layers=4)
  akv.compress(kv, akv.presets.get("hybrid_8x").with_target(None), queries=q, layer=1, num_layers=4)
  with pytest.raises(ValueError, match=r"'hybrid_8x' has target=8x, which compress resolves for the cache's shape"):
    akv.presets.get("hybrid_8x").layout(4096, 0, 30)


def test_every_preset_is_a_hashable_policy():
  for name in akv.presets.names():
    pol = akv.presets.get(name)
    assert isinstance(pol, akv.Policy) and pol.name == name
    hash(pol)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'hybrid_9x'"):
    akv.presets.get("hybrid_9x")


def test_storage_modifiers():
  pol = akv.presets.get("kivi2+rot+out4")
  assert pol.name == "kivi2+rot+out4" and pol.rotation == 0 and pol.keys.outliers == 4
  assert dataclasses.replace(pol, name="kivi2", rotation=None,
                             keys=dataclasses.replace(pol.keys, outliers=0)) == akv.presets.get("kivi2")
  assert akv.presets.get("hybrid_8x+rot7").rotation == 7 and akv.presets.get("hybrid_8x+rot7").budget.target == 8
  assert akv.presets.fixed("hybrid_8x+out2").keys.outliers == 2
  # A target holds with outlier channels too: their bytes are counted when the keep is solved.
  shape = akv.ratios.CacheShape(s=4096, num_layers=30, kv_heads=3, head_dim=64, q_heads=9)
  plain = akv.ratios.resolve_target(akv.presets.get("hybrid_8x"), shape)
  held = akv.ratios.resolve_target(akv.presets.get("hybrid_8x+out4"), shape)
  assert held.keep < plain.keep
  assert abs(akv.ratios.measured_ratio(held, shape) / 8 - 1) < 0.03
  with pytest.raises(ValueError, match="policy 'kivi2\\+foo': unknown storage modifier 'foo'; use rot, rot<seed> or"):
    akv.presets.get("kivi2+foo")
  with pytest.raises(ValueError, match="'snapkv\\+out2': \\+out2 holds outlier key channels beside quantized keys, "
                                       "but 'snapkv' keeps its keys in bf16"):
    akv.presets.get("snapkv+out2")
  with pytest.raises(ValueError, match="unknown preset 'nope'"):
    akv.presets.get("nope+rot")


SMOLLM2 = akv.ratios.CacheShape(s=4096, num_layers=30, kv_heads=3, head_dim=64, q_heads=9)


@pytest.mark.parametrize("name, target", [("snapkv", 8), ("adakv", 8), ("streaming", 5), ("hybrid_12x", 12),
                                          ("h2o", 6)])
def test_fit_keep_reaches_the_target_on_another_model(name, target):
  """The presets are calibrated on H = 128 and S >= 8k; fitted to SmolLM2's shape their measured ratio is the
  target, from above (the fitted policy never holds more than the target allows)."""
  pol = akv.ratios.fit_keep(akv.presets.get(name), target, SMOLLM2)
  ratio = akv.ratios.measured_ratio(pol, SMOLLM2)
  assert target <= ratio <= 1.02 * target, f"{name}: {ratio:.3f}x at keep={pol.keep}"
  assert pol.name == name and pol.selection == akv.presets.get(name).selection


def test_fit_keep_errors():
  with pytest.raises(ValueError, match=r"'kivi2' keeps every token, so keep cannot be fitted; its ratio on this "
                                       r"shape is 4\.21x"):
    akv.ratios.fit_keep(akv.presets.get("kivi2"), 8, SMOLLM2)
  with pytest.raises(ValueError, match=r"'snapkv' reaches at most \d+\.\d+x .* short of the target 500x"):
    akv.ratios.fit_keep(akv.presets.get("snapkv"), 500, SMOLLM2)
  with pytest.raises(ValueError, match="target=0 must be > 0"):
    akv.ratios.fit_keep(akv.presets.get("snapkv"), 0, SMOLLM2)
  with pytest.raises(ValueError, match="kv_heads=0 must be >= 1"):
    akv.ratios.CacheShape(s=16, num_layers=1, kv_heads=0, head_dim=8)


def test_adakv_with_no_body_page():
  """At the guard bands' floor AdaKV selects nothing: with decode room it still compresses (its pages are the
  reserve), without any it is a clear error, not a crash."""
  pol = dataclasses.replace(akv.presets.get("adakv"), keep=36 / 512)
  kv = random_kv(0, b=1, k=2, s=512, h=32)
  q = random_queries(1, b=1, n=4, t=32, h=32)
  ckv = akv.compress(kv, pol, queries=q, reserve=16)
  assert int(ckv.key_fill.sum()) == 0 and ckv.body_capacity == 16
  with pytest.raises(ValueError, match=r"leaves budget='adakv' no body page at S=512 \(layer 0\) and reserve=0"):
    akv.compress(kv, pol, queries=q)
