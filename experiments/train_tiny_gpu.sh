#!/usr/bin/env bash
# Trains the shipped tiny model on a lent GPU (device tool) in one call (318 s on an H200): stage 0
# (experiments/train_tiny_stage0.yaml, dense short recall streams) then stage 1 (experiments/train_tiny.yaml, the
# tasks, from stage 0's model).
#   bash experiments/train_tiny_gpu.sh    (writes $OUT/model.tgz, $OUT/stage0_stdout.txt, $OUT/train_stdout.txt)
# Unpack with: tar xzf model.tgz -C akv_jax/models/  (gives akv_jax/models/default/, stage 0's log and scores
# beside stage 1's as *_stage0.*)
set -u
OUT=${OUT:-/tmp/akv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
nvidia-smi -L || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# The time budgets are in the configs; the timeouts only guard the device call's limit (params are saved at every
# evaluation, so a cut run still leaves a model).
timeout 120 $PY experiments/train_tiny.py --config experiments/train_tiny_stage0.yaml --out out/stage0 \
  --set workers=12 2>&1 | tee "$OUT/stage0_stdout.txt" | tail -3
mkdir -p /tmp/model/default
cp out/stage0/train_log.jsonl /tmp/model/default/train_log_stage0.jsonl
cp out/stage0/scores.json /tmp/model/default/scores_stage0.json
timeout 300 $PY experiments/train_tiny.py --config experiments/train_tiny.yaml --out /tmp/model/default \
  --set workers=12 --set init_from=out/stage0 2>&1 | tee "$OUT/train_stdout.txt" | tail -3
tar czf "$OUT/model.tgz" -C /tmp/model default
ls -la /tmp/model/default
