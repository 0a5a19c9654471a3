"""One resolver for every `implementation=` argument (attend, quantize, append, extend, prefill, decode_step).

The values mean the same thing everywhere:
  "reference"  the plain-jnp definition (dense dequantize and einsums; for quantize and prefill attention the jnp
               code is the reference);
  "xla"        the jnp path built for speed on any backend (attend: akv_jax.chunked); where an operation has
               no separate fast path, the reference is that path (quantize, prefill attention);
  "pallas"     the fused Triton kernel (a GPU, or interpret=True on the CPU);
  None         "pallas" on a GPU where the kernel handles the call, else "xla" where it handles the call, else
               "reference".
An explicit value that cannot run raises ValueError saying why; nothing falls back silently.
"""

from __future__ import annotations

from typing import Literal

import jax

Implementation = Literal["reference", "xla", "pallas"]
IMPLEMENTATIONS: tuple[str, ...] = ("reference", "xla", "pallas")


def check(implementation: str | None, interpret: bool) -> None:
  """What can be told before any operand is seen: a known value, and a GPU (or interpret mode) for "pallas"."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation={implementation!r} is not one of None, 'reference', 'xla', 'pallas'")
  if implementation == "pallas" and jax.default_backend() != "gpu" and not interpret:
    raise ValueError(f"implementation='pallas' needs a GPU (this backend is {jax.default_backend()!r}); pass "
                     "interpret=True to run the kernel in interpret mode, or use implementation='xla'")


def resolve(implementation: str | None, interpret: bool, *, op: str, pallas_why: str | None,
            xla_why: str | None = None) -> Implementation:
  """The implementation an operation runs.

  Args:
    implementation, interpret: as the caller was given them.
    op: the operation's name, for messages ("attend", "quantize", ...).
    pallas_why: None when the kernel handles this call, else why it does not.
    xla_why: None when the "xla" path handles this call, else why it does not.
  """
  check(implementation, interpret)
  if implementation is None:
    if jax.default_backend() == "gpu" and pallas_why is None:
      return "pallas"
    return "xla" if xla_why is None else "reference"
  if implementation == "pallas" and pallas_why is not None:
    raise ValueError(f"{op}(implementation='pallas'): {pallas_why}")
  if implementation == "xla" and xla_why is not None:
    raise ValueError(f"{op}(implementation='xla'): {xla_why}; use implementation='reference' (or None)")
  return implementation  # type: ignore[return-value]
