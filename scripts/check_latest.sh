#!/usr/bin/env bash
# Non-blocking drift check: the newest releases of the dependencies (no constraints.txt) in a
# throwaway venv, against a fast subset of the tests. Tells you when a new transformers,
# accelerate, peft, datasets... breaks ginger-hf before the pinned set-up (scripts/setup.sh) moves.
# torch is installed as setup.sh does (TORCH, default: the CPU build torch==2.13.0 without a GPU,
# so no CUDA download; TORCH=torch tries the newest).
#   bash scripts/check_latest.sh            # prints what differs from constraints.txt, runs the subset
#   KEEP=1 bash scripts/check_latest.sh     # keep the venv (its path is printed)
# Exit status: the tests'. CI does not run it (the pinned suite is .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=$(mktemp -d -t ginger-latest-XXXXXX)
[ -n "${KEEP:-}" ] || trap 'rm -rf "$VENV"' EXIT
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH=${TORCH:-torch}
else
  TORCH=${TORCH:-torch==2.13.0}
fi
"${PIP[@]}" install --upgrade pip
"${PIP[@]}" install "$TORCH"
"${PIP[@]}" install ".[test]"
echo "venv: $VENV"
echo "== newest releases that differ from constraints.txt (what the README's numbers were measured with)"
"$VENV/bin/python" -m pip freeze | grep -v -i "^ginger" | sort >"$VENV/latest.txt"
grep -v "^#" constraints.txt | sort | comm -13 - "$VENV/latest.txt" || true
echo "== fast tests against them"
cd tests  # the installed package, not the clone's ginger_hf
"$VENV/bin/python" -m pytest -q -x -m "not slow" -p no:cacheprovider --rootdir=. \
  test_optimizer_api.py test_torch_contract.py test_registration.py test_trainer_messages.py test_lora.py test_readme.py
