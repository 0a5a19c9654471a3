"""YAML run configs: a mapping of a frozen dataclass's fields, with a --tiny preset and --set overrides on top."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, TypeVar

import yaml

from experiments.run_proxy_experiment import apply_set

C = TypeVar("C")


def load(path: str, cls: type[C], *, required: str, required_hint: str, sets: tuple[str, ...] = (),
         tiny: dict[str, Any] | None = None, default_out: str) -> C:
  """The config `cls(**fields)` of a YAML file: the YAML, then `tiny` (when given), then each `key=value` of sets.

  Unknown fields and a missing `required` field are errors naming them; lists become tuples (the dataclasses are
  hashable). An empty `out` becomes `default_out`, plus "-tiny" for a smoke run without its own out=, so a smoke
  run never overwrites a full run's results.
  """
  raw = yaml.safe_load(pathlib.Path(path).read_text()) or {}
  if not isinstance(raw, dict):
    raise ValueError(f"{path} must hold a mapping of config fields, got {type(raw).__name__}")
  if tiny is not None:
    raw.update(tiny)
  for assignment in sets:
    apply_set(raw, assignment)
  fields = {f.name for f in dataclasses.fields(cls)}
  unknown = sorted(set(raw) - fields)
  if unknown:
    raise ValueError(f"unknown config field(s) {unknown} in {path}; known: {sorted(fields)}")
  if raw.get(required) is None:
    raise ValueError(f"{path} needs a {required!r} field {required_hint}")
  cfg = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
  out = cfg.out or default_out.format(cfg=cfg)
  if tiny is not None and not any(s.startswith("out=") for s in sets):
    out += "-tiny"
  return dataclasses.replace(cfg, out=out)
