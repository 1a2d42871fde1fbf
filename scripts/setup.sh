#!/usr/bin/env bash
# Create .venv (if needed) and install tl_reward with its test tools. Idempotent.
# torch is pinned to 2.13.0 before anything else asks for it: on machines that keep the CPU
# wheel locally pip takes it from there; elsewhere PyPI serves the build for the platform
# (CUDA on Linux x86_64). An already-installed torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "is ignored: it is neither" || true
  .venv/bin/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "is ignored: it is neither" || true
fi
.venv/bin/python -m pip install --quiet -e ".[dev]" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import tl_reward, torch; print(f'tl_reward ready (torch {torch.__version__})')"
