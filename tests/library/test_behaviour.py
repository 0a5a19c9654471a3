"""Every preset's held arrays, attention outputs and the shipped model's greedy tokens match the record made
before the method-layer redesign (tests/library/behaviour/record.py; rerun it with --check for a bit-exact comparison)."""

import numpy as np
import pytest

from behaviour import record


@pytest.fixture(scope="module")
def recorded():
  return record.load()


@pytest.mark.slow
def test_presets_behave_as_recorded(recorded):
  now = record._storable(record.record())
  # Integers exactly; floats to 1e-6 of their scale, for a CPU that orders an f32 reduction differently.
  assert record.compare(now, recorded, rtol=1e-6) == []


def test_compare_names_what_differs(recorded):
  key = next(k for k in recorded if k.endswith(".body_pos"))
  changed = dict(recorded)
  changed[key] = recorded[key].copy()
  changed[key].flat[0] += 1
  del changed[next(iter(recorded))]
  problems = record.compare(changed, recorded)
  assert any(p.startswith(f"{key}: 1 of") for p in problems)
  assert any(p.startswith("missing: ") for p in problems)
  floats = next(k for k, v in recorded.items() if v.dtype == np.float32)
  nudged = dict(recorded, **{floats: recorded[floats] * (1 + 1e-7)})
  assert record.compare(nudged, recorded, rtol=1e-6) == []
  assert record.compare(nudged, recorded) != [] or not np.any(recorded[floats])
