"""What experiment scripts put in their result files: the command that reproduces them, and the JSON itself."""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence


def command_line(script: str, argv: Sequence[str] | None) -> str:
  """`python experiments/<script> <args>`, the args being argv or, when None, this process's own."""
  return " ".join(["python", f"experiments/{script}", *(sys.argv[1:] if argv is None else argv)])


def write_json(path: str | pathlib.Path, result: dict) -> None:
  """Writes result as indented JSON at path, making its folder."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")


def report(result: dict, path: str | pathlib.Path | None) -> dict:
  """Prints result as indented JSON and, when path is given, writes it there too; returns result."""
  print(json.dumps(result, indent=1))
  if path:
    write_json(path, result)
  return result
