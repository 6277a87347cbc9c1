#!/usr/bin/env bash
# Idempotent set-up for a fresh CPU machine: a .venv with a CPU build of torch and pdmd installed.
# A GPU user installs into their own environment instead: `pip install -e ".[dev,gpu]"` keeps their torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch" 2>/dev/null; then
  # A bare `pip install torch` on Linux pulls a multi-GB CUDA build: ask for the CPU build explicitly.
  # PDMD_TORCH_SPEC overrides; the fallback is PyTorch's CPU wheel index.
  pip install -q "${PDMD_TORCH_SPEC:-torch==2.13.0+cpu}" \
    || pip install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
stamp=.venv/.pdmd-installed
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  pip install -q -e ".[dev]"
  touch "$stamp"
fi
python -m pdmd_kernels.build || true   # native CPU backend (optional: needs CMake and a C++ compiler)
