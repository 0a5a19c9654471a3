"""Matrix products inside the Triton kernels: f32 accumulation, operands at their own precision.

16-bit operands (f16/bf16) run on tensor cores as they are. f32 operands are kept in f32 with Precision.HIGHEST:
a plain jnp.dot of f32 operands lowers to TF32 tensor-core products on Hopper (10-bit mantissa), which put an
f32 decode kernel 4e-4 away from its f32 reference on an H200.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def _precision(a: jax.Array, b: jax.Array):
  return lax.Precision.HIGHEST if jnp.float32 in (a.dtype, b.dtype) else lax.Precision.DEFAULT


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """f32[M, N] = a[M, H] @ b[N, H]^T."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=_precision(a, b),
                         preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """f32[M, N] = a[M, H] @ b[H, N]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=_precision(a, b),
                         preferred_element_type=jnp.float32)
