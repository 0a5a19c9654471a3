"""The README's API example runs as written, so it stays true."""

import pathlib
import re

README = pathlib.Path(__file__).resolve().parents[2] / "README.md"


def test_readme_example_runs():
  text = README.read_text()
  match = re.search(r"<!-- readme-example[^>]*-->\s*```python\n(.*?)```", text, re.S)
  assert match, "README lost its marked example"
  namespace: dict = {}
  exec(compile(match.group(1), str(README), "exec"), namespace)
  ckv, kv = namespace["ckv"], namespace["kv"]
  assert namespace["out"].shape == (2, 16, 64)
  assert namespace["scores"].shape == (2, 4, 2048)
  assert namespace["akv"].compression_ratio(kv, ckv) > 2


def test_readme_names_the_ci_command():
  ci = (README.parent / ".ci" / "run").read_text()
  assert "make test" in ci and "make test" in README.read_text()
