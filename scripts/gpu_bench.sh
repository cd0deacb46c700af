#!/usr/bin/env bash
# The GPU figures of the README in one go (about 4 minutes on one H100 or H200):
#
#   scripts/gpu_bench.sh [OUT_DIR]        # default gpu-bench/
#
# 1. exactness on the GPU: every family's engine against the brute force (scripts/gpu_check.py);
# 2. python -m so2lib.bench on CUDA: all 36,864 neurons of a GPT-2-small shape over 5,000
#    problems, full vectors, bfloat16/float16 against float32, and the Llama-3.2-1B and
#    Llama-3-8B shapes in bfloat16 under an 8 GiB engine budget (time and peak GPU memory), each
#    loaded twice: weights processed on the GPU, then on the CPU (load_model's process_on), with
#    the logits' and effects' difference between the two.
# Each step writes its JSON as it finishes, so a run cut short keeps what it measured.
set -u
OUT=${1:-gpu-bench}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
quiet() { grep -v --line-buffered -E "^(Loading weights|Writing model shards)|it/s\]$|s/it\]$"; }
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
  $PY -c "import torch, transformers, importlib.metadata as m; print('torch', torch.__version__, '| transformers', transformers.__version__, '| transformer-lens', m.version('transformer-lens'), '| cuda', torch.version.cuda)"
} 2>&1 | tee "$OUT/machine.txt"
timeout "${CHECK_TIMEOUT:-150}" $PY scripts/gpu_check.py cuda "$OUT/exact.json" 2>&1 | quiet | tee "$OUT/exact.log"
timeout "${BENCH_TIMEOUT:-480}" $PY -m so2lib.bench --device cuda --models gpt2-small-shaped --problems 5000 \
  --batch-size 250 --llama-dtype bfloat16 --llama-8b --llama-problems 64 --max-memory 8GiB \
  --llama-process-on device cpu --out "$OUT/bench.json" 2>&1 | quiet | tee "$OUT/bench.log"
