#!/usr/bin/env bash
# One-step set-up: .venv with torch and ginger-hf installed (editable), at the versions in
# constraints.txt (those the README's numbers were measured with; CI uses them too).
#   bash scripts/setup.sh          # the package and what the main job needs (extra "recipes")
#   bash scripts/setup.sh --test   # ... plus the test tools (extra "test")
# Newest releases instead, in a throwaway venv: bash scripts/check_latest.sh
# A torch already in .venv is kept (GPU users: install your CUDA build there first).
# Otherwise, with no NVIDIA GPU visible, the CPU build torch==$CPU_TORCH is installed first
# so that resolving the package's `torch` requirement downloads no CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
CPU_TORCH=${CPU_TORCH:-2.13.0}
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip

if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install torch
  else
    "${PIP[@]}" install "torch==${CPU_TORCH}"
  fi
fi

extras="recipes"
[ "${1:-}" = "--test" ] && extras="recipes,test"
"${PIP[@]}" install -c constraints.txt -e ".[${extras}]"
.venv/bin/python - <<'PY'
import torch, ginger_hf
from ginger_hf import kernel
step = "compiled CPU kernel" if kernel.available() else "torch step (no compiler found)"  # builds it once
print("ginger-hf", ginger_hf.__version__, "| torch", torch.__version__, "|", step)
PY
