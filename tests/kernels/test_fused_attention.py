"""akv.attend(implementation="pallas") and the chunked XLA path == the reference on caches built by compress and
append, for every preset layout (the kernel in interpret mode on CPU; the real kernel when a GPU is present)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import akv_jax as akv
from akv_jax import chunked, fused, testing

INTERPRET = jax.default_backend() != "gpu"
B, K, N, H, S = 2, 2, 8, 64, 300


def build(preset: str, steps: int, seed: int = 0):
  """A cache compressed from a ragged prefill, then `steps` appended tokens (KIVI patch, flushes)."""
  pol = akv.presets.fixed(preset)
  kv = testing.random_kv(seed, b=B, k=K, s=S, h=H, lengths=[S, 211], dtype=jnp.bfloat16)
  q_obs = testing.random_queries(seed + 1, b=B, n=N, t=32, h=H, dtype=jnp.bfloat16)
  ckv = akv.compress(kv, pol, queries=q_obs, layer=1, num_layers=4, reserve=steps + 1)
  ks = jax.random.normal(jax.random.key(seed + 2), (steps, 2, B, K, H)).astype(jnp.bfloat16)
  for t in range(steps):
    ckv = akv.append(ckv, ks[t, 0], ks[t, 1], pol)
  return ckv


@pytest.mark.parametrize("preset,steps", [
    ("kivi2", 0), ("kivi2", 45), ("kivi4", 7), ("hybrid_5x", 3), ("hybrid_8x", 40), ("hybrid_12x", 0),
    ("hybrid_12x", 37), ("snapkv", 2), ("adakv", 3), ("streaming", 5), ("full", 1),
])
def test_pallas_matches_xla(preset, steps):
  ckv = build(preset, steps)
  q = testing.random_queries(9, b=B, n=N, t=None, h=H, dtype=jnp.bfloat16)
  if steps:  # the patch path is what this case is for: some values must have run ahead of their keys
    assert preset not in ("kivi2", "hybrid_8x") or int(jnp.max(ckv.value_fill - ckv.key_fill)) > 0
  got = akv.attend(q, ckv, implementation="pallas", interpret=INTERPRET)
  want = akv.attend(q, ckv, implementation="reference")
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=2e-2, atol=2e-2)
  # f32 outputs, to see past the bf16 rounding of the result.
  qf = q.astype(jnp.float32)
  ref = np.asarray(akv.attend(qf, ckv, implementation="reference"))
  tol = testing.kernel_tolerance(ckv)
  np.testing.assert_allclose(np.asarray(akv.attend(qf, ckv, implementation="pallas", interpret=INTERPRET)), ref,
                             rtol=tol, atol=tol)
  # The chunked XLA path, with its default chunk and with small chunks (many steps, an overlapping last one).
  np.testing.assert_allclose(np.asarray(akv.attend(qf, ckv, implementation="xla")), ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(chunked.attend(qf, ckv, chunk=96)), ref, rtol=1e-5, atol=1e-5)


def test_default_implementation_is_xla_on_cpu():
  ckv = build("kivi2", 0)
  q = testing.random_queries(3, b=B, n=N, t=None, h=H)
  if jax.default_backend() == "gpu":
    pytest.skip("on a GPU the default is the kernel")
  np.testing.assert_array_equal(np.asarray(akv.attend(q, ckv)), np.asarray(akv.attend(q, ckv, implementation="xla")))
  assert fused.supported(q, ckv, False) and not fused.supported(q, ckv, True)
