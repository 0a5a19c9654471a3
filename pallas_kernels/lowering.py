"""Lowering a kernel for CUDA on a machine without a GPU, with the Triton module verified.

`jax.jit(f).trace(...).lower(lowering_platforms=("cuda",))` builds each pallas_call's Triton IR on the CPU, which
catches unsupported primitives and shapes. Some errors only surface when the GPU runtime parses the module (for
example an scf.for whose bounds have different integer types, from `jnp.where(pred, 4, 0)` as a trip count);
running the MLIR verifier on the module here catches those too. The verifier hook reads JAX internals, so when
they move it is skipped and the plain lowering check remains.

Newer JAX asks `gpu_info_lib.get_gpu_info()` for the device's compute capability before building the module,
and on a machine without a GPU that lookup raises; `pinned_gpu_info` answers it with an H200 (sm_90, what the
kernels are tuned for) while lowering. JAX 0.10.2 has no such lookup (it falls back to sm_90 itself), so there
it does nothing.
"""

from __future__ import annotations

import contextlib

import jax


@contextlib.contextmanager
def pinned_gpu_info():
  """While lowering without a GPU, the Triton lowering's GPU-info lookup answers with an H200; restored after.

  With a GPU present, or on a JAX whose Triton lowering has no such lookup, nothing is patched.
  """
  try:
    from jax._src.pallas.triton import pallas_call_registration  # noqa: PLC0415 (internal, may move)
  except ImportError:
    yield
    return
  info_lib = getattr(pallas_call_registration, "gpu_info_lib", None)
  if info_lib is None or jax.default_backend() == "gpu":
    yield
    return
  original = info_lib.get_gpu_info
  info = info_lib.get_gpu_info_from_version(info_lib.GpuVersion.H200)
  info_lib.get_gpu_info = lambda: info
  try:
    yield
  finally:
    info_lib.get_gpu_info = original


@contextlib.contextmanager
def _verifying():
  """Runs the MLIR verifier on each Triton module right after it is built, inside the lowering that owns it (a
  module is not touched once its lowering has returned)."""
  try:
    from jax._src.pallas.triton import lowering as triton_lowering  # noqa: PLC0415 (internal, may move)
  except ImportError:
    yield
    return
  original = triton_lowering.lower_jaxpr_to_triton_module

  def verified(*args, **kwargs):
    result = original(*args, **kwargs)
    result.module.operation.verify()
    return result

  triton_lowering.lower_jaxpr_to_triton_module = verified
  try:
    yield
  finally:
    triton_lowering.lower_jaxpr_to_triton_module = original


def lower_for_cuda(fn, *args, **kwargs) -> str:
  """Lowers jax.jit(fn)(*args, **kwargs) for CUDA, verifying every Triton module it builds.

  Returns the StableHLO text; raises whatever the lowering or the MLIR verifier raises.
  """
  with pinned_gpu_info(), _verifying():
    return jax.jit(fn).trace(*args, **kwargs).lower(lowering_platforms=("cuda",)).as_text()
