"""Presets: each N-x preset measures 0.97N..1.15N from the arrays it holds, at S = 8192 and 32768."""

import jax
import jax.numpy as jnp
import pytest

import akv_jax as akv
from akv_jax.testing import random_kv, random_queries

L, B, K, N, H, W = 32, 1, 8, 32, 128, 32


def _held_bytes(policy, s):
  """Bytes every layer's cache holds, from the shapes compress produces (exact: all storage is static-shaped)."""
  kv = akv.DenseKV(k=jax.ShapeDtypeStruct((B, K, s, H), jnp.bfloat16),
                   v=jax.ShapeDtypeStruct((B, K, s, H), jnp.bfloat16),
                   lengths=jax.ShapeDtypeStruct((B,), jnp.int32))
  q = jax.ShapeDtypeStruct((B, N, W, H), jnp.bfloat16)
  return sum(akv.nbytes(jax.eval_shape(
      lambda kv, q, layer=layer: akv.compress(kv, policy, queries=q, layer=layer, num_layers=L), kv, q))
             for layer in range(L))


def test_shape_bytes_equal_held_bytes():
  """The eval_shape accounting used below is the same number as arrays actually materialized."""
  kv = random_kv(0, b=2, k=2, s=512, h=64, dtype=jnp.bfloat16)
  q = random_queries(1, b=2, n=8, t=32, h=64, dtype=jnp.bfloat16)
  for name in akv.presets.names():
    ckv = akv.compress(kv, akv.presets.get(name), queries=q, layer=3, num_layers=8)
    shapes = jax.eval_shape(lambda kv, q: akv.compress(kv, akv.presets.get(name), queries=q, layer=3,
                                                       num_layers=8), kv, q)
    assert akv.nbytes(ckv) == akv.nbytes(shapes)


@pytest.mark.parametrize("name, target", [("hybrid_5x", 5), ("hybrid_8x", 8), ("hybrid_12x", 12)])
@pytest.mark.parametrize("s", [8192, 32768])
def test_named_ratio(name, target, s):
  ratio = 2 * 2 * B * K * s * H * L / _held_bytes(akv.presets.get(name), s)
  assert 0.97 * target <= ratio <= 1.15 * target, f"{name} at S={s}: {ratio:.2f}x"


def test_every_preset_is_a_hashable_policy():
  for name in akv.presets.names():
    pol = akv.presets.get(name)
    assert isinstance(pol, akv.Policy) and pol.name == name
    hash(pol)


def test_unknown_preset():
  with pytest.raises(ValueError, match="unknown preset 'hybrid_9x'"):
    akv.presets.get("hybrid_9x")
