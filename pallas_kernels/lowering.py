"""Lowering a kernel for CUDA on a machine without a GPU, with the Triton module verified.

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` builds each pallas_call's Triton IR on the CPU, which
catches unsupported primitives and shapes. Some errors only surface when the GPU runtime parses the module (for
example an scf.for whose bounds have different integer types, from `jnp.where(pred, 4, 0)` as a trip count);
running the MLIR verifier on the module here catches those too. The verifier hook reads JAX internals, so when
they move it is skipped and the plain lowering check remains.
"""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def _capture_modules():
  try:
    from jax._src.pallas.triton import lowering as triton_lowering  # noqa: PLC0415 (internal, may move)
  except ImportError:
    yield None
    return
  modules = []
  original = triton_lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    modules.append(result.module)
    return result

  triton_lowering.lower_jaxpr_to_triton_module = capture
  try:
    yield modules
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original


def lower_for_cuda(fn, *args, **kwargs) -> str:
  """Lowers jax.jit(fn)(*args, **kwargs) for CUDA and verifies every Triton module it builds.

  Returns the StableHLO text; raises whatever the lowering or the MLIR verifier raises.
  """
  with _capture_modules() as modules:
    text = jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()
  for module in modules or ():
    module.operation.verify()
  return text
