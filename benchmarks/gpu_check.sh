#!/usr/bin/env bash
# The GPU checks in one command, under 8 minutes on one GPU: gpt2-124m bf16 MFU, the memory
# estimate against torch.cuda.max_memory_allocated, and serving an export through vLLM (Ray Serve
# LLM). One table at the end; on a machine without a CUDA GPU it stops at once and says so (exit 2).
#   bash benchmarks/gpu_check.sh [--steps 40] [--skip-vllm]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec timeout --signal=INT --kill-after=20 480 "$PY" benchmarks/gpu_check.py "$@"
