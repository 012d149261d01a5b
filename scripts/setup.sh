#!/usr/bin/env bash
# Set up a virtual environment in .venv with raysparse and its test tools.
# torch is installed first and on its own: a bare `torch` requirement would otherwise pull a
# multi-GB CUDA build on machines where a CPU wheel is the right (or only local) choice.
# Override with TORCH_SPEC, e.g. TORCH_SPEC="torch" on a GPU box.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -c "import torch" 2>/dev/null || pip install -q "$TORCH_SPEC"
pip install -q -e ".[test]"
