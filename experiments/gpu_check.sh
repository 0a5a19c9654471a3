#!/usr/bin/env bash
# Everything that needs a GPU, in one device call of at most ~8 minutes (device tool, see the developers' guide):
#   bash experiments/gpu_check.sh            writes under $OUT: gpu_tests.log, bench_decode_attention.{json,md}
# The kernel tests run compiled (not interpreted) when JAX sees a GPU; the benchmark times the fused decode
# kernel against dense bf16 baselines. Copy the results into experiments/results/ and commit them.
set -u
OUT=${OUT:-/tmp/akv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
nvidia-smi -L || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# 1. Kernel and dispatch tests on the GPU (about 2 minutes).
timeout 200 $PY -m pytest -q -x tests/test_kernel_decode.py tests/test_kernel_quantize.py tests/test_kernel_prefill.py \
  tests/test_fused_attention.py tests/test_paging.py tests/test_model_kernels.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -5
# 2. The decode-attention benchmark (about 4 minutes).
timeout 260 $PY experiments/bench_decode_attention.py --out "$OUT/bench_decode_attention.json" 2>&1 \
  | tee "$OUT/bench_stdout.txt"
