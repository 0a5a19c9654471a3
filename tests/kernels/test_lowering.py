"""pallas_kernels.lowering: the CUDA lowering check really runs the Triton verifier."""

import jax
import jax.numpy as jnp
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import lowering


def _call(trip_count):
  def kernel(x_ref, n_ref, o_ref):
    o_ref[...] = jax.lax.fori_loop(0, trip_count(n_ref[0]), lambda i, a: a + 1.0, x_ref[...])

  def f(x, n):
    return pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((16,), jnp.float32), grid=(1,),
                          compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2))(x, n)
  return f


def test_verifier_catches_a_loop_the_gpu_runtime_rejects():
  args = (jnp.ones(16), jnp.array([3], jnp.int32))
  assert "__gpu$xla.gpu.triton" in lowering.lower_for_cuda(_call(lambda n: jnp.minimum(n, 4)), *args)
  # A where() of two Python ints as the trip count lowers, but its scf.for bounds disagree in type: the GPU
  # runtime fails to parse such a module, and so must this check.
  with pytest.raises(Exception, match="scf.for"):
    lowering.lower_for_cuda(_call(lambda n: jnp.where(n > 2, 4, 0)), *args)
