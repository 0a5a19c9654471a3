#!/usr/bin/env bash
# Trains the shipped tiny model on a lent GPU (device tool) in one call of about 8 minutes:
#   bash experiments/train_tiny_gpu.sh [CONFIG]   (writes $OUT/model.tgz, $OUT/train_stdout.txt)
# CONFIG defaults to experiments/train_tiny.yaml (stage 1, from scratch); experiments/train_tiny_stage2.yaml
# continues the committed model, whose log and scores are kept beside the new ones as *_stage1.*.
# Unpack with: tar xzf model.tgz -C akv_jax/models/  (gives akv_jax/models/default/)
set -u
OUT=${OUT:-/tmp/akv_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
PY=${PY:-python3}
nvidia-smi -L || true
$PY -c "import jax; print('jax', jax.__version__, jax.devices())"
# The time budget in the config is 6 min of training; the timeout only guards the call's 10-minute limit
# (params are saved at every evaluation, so a cut run still leaves a model).
CONFIG=${1:-experiments/train_tiny.yaml}
mkdir -p /tmp/model/default
if grep -q '^init_from:' "$CONFIG"; then
  cp akv_jax/models/default/train_log.jsonl /tmp/model/default/train_log_stage1.jsonl
  cp akv_jax/models/default/scores.json /tmp/model/default/scores_stage1.json
fi
timeout 500 $PY experiments/train_tiny.py --config "$CONFIG" --out /tmp/model/default \
  --set workers=12 2>&1 | tee "$OUT/train_stdout.txt"
tar czf "$OUT/model.tgz" -C /tmp/model default
ls -la /tmp/model/default
