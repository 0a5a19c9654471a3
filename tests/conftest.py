"""Session-wide test settings."""

import jax

# On a GPU, XLA runs f32 matmuls as TF32 by default (10-bit mantissa), which puts the plain-jnp references
# 1e-3 away from the kernels, whose products are IEEE f32 (pallas_kernels/dots.py). Compare at f32.
if jax.default_backend() == "gpu":
  jax.config.update("jax_default_matmul_precision", "float32")
