#!/usr/bin/env bash
# GPU load peak and its remedy, plus the GPT-2-small-shape timing, in one go (about 4 minutes):
#
#   scripts/gpu_load.sh [OUT_DIR]
#
# 1. all 36,864 neurons of a GPT-2-small shape over 5,000 problems (no approximations);
# 2. the Llama-3-8B shape in bfloat16 loaded twice, processing the weights on the GPU and on the
#    CPU (load_model's process_on), each with its GPU peak, load time, effects and the
#    logits'/effects' difference between the two.
set -u
OUT=${1:-gpu-load}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet() { grep -v --line-buffered -E "^(Loading weights|Writing model shards)|it/s\]$|s/it\]$"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/machine.txt"
timeout "${GPT2_TIMEOUT:-180}" $PY -m so2lib.bench --device cuda --models gpt2-small-shaped --problems 5000 \
  --batch-size 250 --no-approximations --llama-layers 0 --out "$OUT/gpt2.json" 2>&1 | quiet | tail -4
timeout "${LOAD_TIMEOUT:-300}" $PY -m so2lib.bench --device cuda --models --llama-layers 0 --llama-8b \
  --llama-dtype bfloat16 --llama-problems 64 --max-memory 8GiB --llama-process-on device cpu \
  --out "$OUT/load8b.json" 2>&1 | quiet | tail -4
