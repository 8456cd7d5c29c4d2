#!/usr/bin/env bash
# Issue 16's GPU check, one command on a lent GPU machine (one H100 or H200; about 5-8 minutes):
# Llama-3.2-11B-Vision's geometry at full width with random weights, loaded 4-bit, one QLoRA DPO step
# at batch 1 and one PPO iteration with gradient checkpointing; prints peak GPU memory and tokens/s
# and writes $OUT/gpu_check.json.
#
# The GPU image has torch, transformers, peft and accelerate but not bitsandbytes or datasets, and
# nothing can be fetched there: make the wheels here first (bash bench/gpu_wheels.sh, into .whl/,
# which git ignores) and carry `.whl` with the run:
#   run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# On CPU the same path runs at the stand-in's width: python bench/gpu_check.py --width small
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/vlm-align-bench}"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python3 bench/gpu_check.py --width full --out "$OUT/gpu_check.json" --workdir /tmp/gpu-check
