#!/usr/bin/env bash
# GPU benchmark: InternVL2-1B / 2B full fine-tuning (packed and padded) and 8B LoRA, random weights, bf16,
# gradient checkpointing; tokens/s, MFU against the measured bf16 matmul rate, peak memory (scripts/bench/gpu.py).
# Needs a CUDA build of torch in $PYTHON (default: .venv/bin/python, else python); flash-attention 2 is used
# when `flash_attn` imports. About 10 minutes on one H100. Output also goes to ${OUT:-.}/gpu_bench.txt.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
export PYTHONPATH=$PWD
if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no CUDA device visible to $PYTHON (torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))" >&2
  exit 1
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
timeout "${TIMEOUT:-540}" "$PYTHON" scripts/bench/gpu.py "$@" 2>&1 | tee "${OUT:-.}/gpu_bench.txt"
