#!/usr/bin/env bash
# Trains the shipped tiny model on a lent GPU (device tool) in one call.
#   bash experiments/toy/train_tiny_gpu.sh          stage 0 (experiments/toy/train_tiny_stage0.yaml, dense short
#                                                   recall streams) then stage 1 (experiments/toy/train_tiny.yaml,
#                                                   the tasks, from stage 0's model): 318 s on an H200
#   STAGE=2 bash experiments/toy/train_tiny_gpu.sh  stage 2 only (experiments/toy/train_tiny_stage2.yaml): continues
#                                                   the committed akv_jax/models/default, so unpack stage 1's model
#                                                   first (8 minutes of training, 544 s on an H200 with the tests)
#   KERNEL_TESTS=1 ...                              also runs the GPU kernel tests (those of experiments/gpu_check.sh)
#                                                   beside the training, into $OUT/gpu_tests.log: they are small,
#                                                   compile-bound jobs, and a device call has no time for both in
#                                                   turn. No benchmark runs beside training, since timings would be
#                                                   disturbed.
# Writes $OUT/model.tgz and each stage's stdout in $OUT. Unpack with: tar xzf model.tgz -C akv_jax/models/
# (gives akv_jax/models/default/, with the earlier stages' logs and scores beside the last one's as
# train_log_stage<k>.jsonl and scores_stage<k>.json).
set -u
OUT=${OUT:-/tmp/akv_out}
STAGE=${STAGE:-1}
mkdir -p "$OUT" /tmp/model/default
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
nvidia-smi -L || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# The time budgets are in the configs; the timeouts only guard the device call's limit (params are saved at every
# evaluation, so a cut run still leaves a model).
if [ "${KERNEL_TESTS:-0}" = 1 ]; then
  bash experiments/gpu_tests.sh 540 >/dev/null &
  TESTS_PID=$!
fi
if [ "$STAGE" = 2 ]; then
  cp akv_jax/models/default/train_log_stage0.jsonl akv_jax/models/default/scores_stage0.json /tmp/model/default/
  cp akv_jax/models/default/train_log.jsonl /tmp/model/default/train_log_stage1.jsonl
  cp akv_jax/models/default/scores.json /tmp/model/default/scores_stage1.json
  timeout 560 $PY experiments/toy/train_tiny.py --config experiments/toy/train_tiny_stage2.yaml \
    --out /tmp/model/default --set workers=12 2>&1 | tee "$OUT/stage2_stdout.txt" | tail -3
else
  timeout 120 $PY experiments/toy/train_tiny.py --config experiments/toy/train_tiny_stage0.yaml --out out/stage0 \
    --set workers=12 2>&1 | tee "$OUT/stage0_stdout.txt" | tail -3
  cp out/stage0/train_log.jsonl /tmp/model/default/train_log_stage0.jsonl
  cp out/stage0/scores.json /tmp/model/default/scores_stage0.json
  timeout 300 $PY experiments/toy/train_tiny.py --config experiments/toy/train_tiny.yaml --out /tmp/model/default \
    --set workers=12 --set init_from=out/stage0 2>&1 | tee "$OUT/train_stdout.txt" | tail -3
fi
tar czf "$OUT/model.tgz" -C /tmp/model default
if [ -n "${TESTS_PID:-}" ]; then
  wait "$TESTS_PID"
  grep -E "^== |passed|failed" "$OUT/gpu_tests.log"
fi
ls -la /tmp/model/default
