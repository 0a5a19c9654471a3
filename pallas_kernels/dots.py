"""Matrix products inside the Triton kernels, at IEEE f32 precision.

A plain jnp.dot of f32 operands lowers to TF32 tensor-core products on Hopper (10-bit mantissa), which put the
decode kernel 4e-4 away from its f32 reference on an H200. Precision.HIGHEST keeps f32 inputs in f32. The kernels
that use these are memory-bound (decode) or already validated this way on a GPU (prefill).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


def dot_nt(a: jax.Array, b: jax.Array) -> jax.Array:
  """f32[M, N] = a[M, H] @ b[N, H]^T."""
  return lax.dot_general(a, b, (((1,), (1,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)


def dot_nn(a: jax.Array, b: jax.Array) -> jax.Array:
  """f32[M, N] = a[M, H] @ b[H, N]."""
  return lax.dot_general(a, b, (((1,), (0,)), ((), ())), precision=lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)
