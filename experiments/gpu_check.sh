#!/usr/bin/env bash
# Everything that needs a GPU, in one device call of at most ~8 minutes (device tool, see the developers' guide):
#   bash experiments/gpu_check.sh            writes under $OUT: gpu_tests.log, bench_decode_attention.{json,md}
# The kernel tests run compiled (not interpreted) when JAX sees a GPU; the benchmark times the fused decode
# kernel against dense bf16 baselines and rewrites its json after every (S, B), so a cut run keeps its rows.
#   BUDGET_S=300 BENCH_ARGS="--seqs 4096,32768 --batches 1,8" bash experiments/gpu_check.sh
# fits both into a shorter call (the tests get 40% of the budget, at most 200 s; the benchmark the rest).
set -u
OUT=${OUT:-/tmp/akv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-460}
BENCH_ARGS=${BENCH_ARGS:-}
START=$(date +%s)
nvidia-smi -L || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# 1. Kernel and dispatch tests on the GPU.
TESTS_S=$(( BUDGET_S * 2 / 5 < 200 ? BUDGET_S * 2 / 5 : 200 ))
bash experiments/gpu_tests.sh "$TESTS_S"
# 2. The decode-attention benchmark, in what is left.
BENCH_S=$(( BUDGET_S - ($(date +%s) - START) ))
# shellcheck disable=SC2086
timeout "$BENCH_S" $PY experiments/bench_decode_attention.py --out "$OUT/bench_decode_attention.json" $BENCH_ARGS \
  2>&1 | tee "$OUT/bench_stdout.txt"
