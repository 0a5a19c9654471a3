"""The benchmark scripts end to end at smoke size (--tiny): they run, agree with the reference and write their
JSON and markdown. Timings here mean nothing; the scripts' real runs are committed under experiments/results/."""

import json
import pathlib
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))

from experiments import bench_cpu_attention, bench_decode_attention  # noqa: E402


def test_bench_cpu_attention_tiny(tmp_path):
  out = tmp_path / "cpu.json"
  result = bench_cpu_attention.main(["--tiny", "--out", str(out)])
  saved = json.loads(out.read_text())
  assert saved["rows"] and saved["machine"]["processor"] and out.with_suffix(".md").is_file()
  for row in result["rows"]:
    assert row["layer_ratio"] > 1 and row["xla_ms"] > 0 and row["max_abs_diff_xla_vs_reference"] < 1e-2


def test_bench_decode_attention_tiny(tmp_path):
  out = tmp_path / "gpu.json"
  result = bench_decode_attention.main(["--tiny", "--out", str(out)])
  assert result["interpret"] and json.loads(out.read_text())["rows"]
  for row in result["rows"]:
    assert row["read_bytes"] > 0 and row["max_abs_diff_vs_reference"] < 1e-2
    # A baseline that cannot run here (cuDNN on a CPU) is recorded with its reason, not dropped.
    assert isinstance(row["dense_ms"]["sdpa_xla"], float) and "sdpa_cudnn" in row["dense_ms"]
