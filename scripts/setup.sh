#!/usr/bin/env bash
# Create .venv and install the project with everything the demo and the tests need.
# torch is installed first and pinned: on our machines torch==2.13.0 is a local CPU wheel, while an
# unpinned torch would pull a multi-GB CUDA build. Safe to run again (pip skips what is there).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e '.[all]'
echo "setup done: $(.venv/bin/python -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)')"
