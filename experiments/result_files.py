"""What experiment scripts put in their result files: the command that reproduces them, the machine it ran on,
and the JSON itself."""

from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
from collections.abc import Callable, Sequence
from typing import Any


def command_line(script: str, argv: Sequence[str] | None) -> str:
  """`python experiments/<script> <args>`, the args being argv or, when None, this process's own."""
  return " ".join(["python", f"experiments/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_json(path: str | pathlib.Path, result: dict, *, default: Callable[[Any], Any] | None = None) -> None:
  """Writes result as indented JSON at path, making its folder; `default` converts what JSON cannot hold (as in
  json.dumps)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1, default=default) + "\n")


def report(result: dict, path: str | pathlib.Path | None) -> dict:
  """Prints result as indented JSON and, when path is given, writes it there too; returns result."""
  print(json.dumps(result, indent=1))
  if path:
    write_json(path, result)
  return result


def cpu_model() -> str:
  """The CPU's model name ("" when unknown). platform.processor() is empty on most Linux systems, where
  /proc/cpuinfo names the CPU."""
  if platform.processor():
    return platform.processor()
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return ""


def machine() -> dict:
  """Where the numbers came from (no host name): CPU, cores, platform, Python, JAX and the device it ran on."""
  import jax  # noqa: PLC0415 (bench_peers reads cpu_model without JAX)
  dev = jax.devices()[0]
  return dict(processor=cpu_model(), cpu_count=os.cpu_count(), machine=platform.machine(), system=platform.system(),
              python=platform.python_version(), jax=jax.__version__, backend=jax.default_backend(),
              device_kind=dev.device_kind, device_count=jax.device_count())
