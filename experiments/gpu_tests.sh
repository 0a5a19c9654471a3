#!/usr/bin/env bash
# The kernel and dispatch tests, compiled for the GPU (JAX sees one), one pytest process per file until a deadline:
#   bash experiments/gpu_tests.sh SECONDS      appends to $OUT/gpu_tests.log
# One process per file so a file that finishes has written its failure report even when the deadline cuts a
# later one (a single cut process would leave only its progress dots); -v names every test as it ends.
set -u
OUT=${OUT:-/tmp/akv_out}
PY=${PY:-python3}
LOG="$OUT/gpu_tests.log"
DEADLINE=$(( $(date +%s) + ${1:?usage: gpu_tests.sh SECONDS} ))
mkdir -p "$OUT"
for f in tests/kernels/test_kernel_decode.py tests/kernels/test_kernel_quantize.py tests/kernels/test_kernel_prefill.py \
    tests/kernels/test_fused_attention.py tests/kernels/test_paging.py tests/kernels/test_model_kernels.py; do
  left=$(( DEADLINE - $(date +%s) ))
  if [ "$left" -le 5 ]; then
    echo "== $f: not run, the deadline has passed" >>"$LOG"
    continue
  fi
  echo "== $f (up to ${left} s)" >>"$LOG"
  timeout "$left" $PY -m pytest -o addopts= -v -rfE --tb=short -p no:cacheprovider "$f" >>"$LOG" 2>&1
  echo "== $f: exit $?" >>"$LOG"
done
grep -E "^== |passed|failed" "$LOG" | tail -20
