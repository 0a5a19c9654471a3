"""YAML run configs: a mapping of a frozen dataclass's fields, with a --tiny preset and --set overrides on top.

The one place experiment scripts read their YAML configs and apply `--set key=value`: run_real.py, the toy model's
runners (experiments/toy/), train_tiny.py, longbench.py, and the synthetic-data runner, whose nested config reads
its file with `read` and applies `apply_set` itself.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, TypeVar

import yaml

C = TypeVar("C")


def read(path: str | None) -> dict[str, Any]:
  """The mapping a YAML config file holds ({} for an empty file or no path); anything else is an error naming it."""
  if path is None:
    return {}
  raw = yaml.safe_load(pathlib.Path(path).read_text()) or {}
  if not isinstance(raw, dict):
    raise ValueError(f"{path} must hold a mapping of config fields, got {type(raw).__name__}")
  return raw


def apply_set(raw: dict[str, Any], assignment: str) -> None:
  """Applies one `dotted.key=value` override to a raw config dict in place; the value is parsed as YAML."""
  key, sep, text = assignment.partition("=")
  if not sep or not key:
    raise ValueError(f"--set {assignment!r} must look like key=value (e.g. artifact.seq_len=1024)")
  value = yaml.safe_load(text) if text else None
  *parents, leaf = key.split(".")
  node = raw
  for i, part in enumerate(parents):
    child = node.setdefault(part, {})
    if not isinstance(child, dict):
      raise ValueError(f"--set {assignment!r}: {'.'.join(parents[:i + 1])} is {child!r}, not a mapping")
    node = child
  node[leaf] = value


def load(path: str | None, cls: type[C], *, required: str | None = None, required_hint: str = "",
         sets: tuple[str, ...] = (), tiny: dict[str, Any] | None = None, default_out: str = "") -> C:
  """The config `cls(**fields)` of a YAML file: the YAML, then `tiny` (when given), then each `key=value` of sets.

  Unknown fields and a missing `required` field are errors naming them; lists become tuples (the dataclasses are
  hashable). No path means the dataclass's defaults. An empty `out` becomes `default_out`, and a smoke run
  (`tiny`) without its own out= writes to its out plus "-tiny", so a smoke run never overwrites a full run's
  results (or, for train_tiny.py, the shipped model).
  """
  raw = read(path)
  if tiny is not None:
    raw.update(tiny)
  for assignment in sets:
    apply_set(raw, assignment)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - fields)
  where = f" in {path}" if path else ""
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown}{where}; known: {sorted(fields)}")
  if required is not None and raw.get(required) is None:
    raise ValueError(f"{path or 'the config'} needs a {required!r} field {required_hint}".rstrip())
  cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
  if "out" not in fields:
    return cfg
  out = cfg.out or default_out.format(cfg=cfg)
  if tiny is not None and not any(s.startswith("out=") for s in sets):
    out += "-tiny"
  return dataclasses.replace(cfg, out=out)
