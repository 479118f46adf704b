#!/usr/bin/env bash
# The GPU check of the device-resident step (issue 19), one script for the day a GPU is lent (< 10 min on one):
#   1. the tests that run on CUDA, on CUDA: the device path against the dense oracle and the reference
#      (tests/test_device_step.py adds "cuda" to its device list when there is one), the fake-device and
#      host-sync checks, and the exactness tests of the torch backend;
#   2. scripts/bench_step.py --only a --device cuda: step time against fused AdamW;
#   3. scripts/count_launches.py --device cuda: CUDA kernels per step beside foreach AdamW (torch.profiler);
#   4. scripts/bench_train.py on a T5-small-shaped model in bf16: Trainer seconds per step, Ginger vs AdamW.
# --dry-run runs the same steps on CPU at tiny sizes (tests/test_gpu_check.py runs it in CI).
# It has not run on a GPU yet.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}"
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT=${GPU_CHECK_OUT:-outputs/gpu_check}
mkdir -p "$OUT"
say() { echo; echo "== $* ($(date -u +%H:%M:%S))"; }

if (( DRY )); then
  DEV=cpu
  say "tests (CPU, the device path's subset)"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_device_step.py -k "oracle or reference or synchronisation"
else
  DEV=cuda
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
  say "tests on CUDA"
  "$PY" -m pytest -q -p no:cacheprovider tests/test_device_step.py \
    "tests/test_exactness.py::test_every_backend_matches_dense_reference"
fi

say "bench_step.py --only a --device $DEV"
if "$PY" scripts/bench_step.py --help | grep -q -- "--tiny"; then
  if (( DRY )); then "$PY" scripts/bench_step.py --only a --device cpu --tiny --steps 2
  else "$PY" scripts/bench_step.py --only a --device cuda --json "$OUT/bench_step.json"; fi
else
  echo "scripts/bench_step.py has no --device/--tiny yet (the cpu worktree adds them): not run"
fi

say "count_launches.py --device ${DEV/cpu/fake}"
if (( DRY )); then "$PY" scripts/count_launches.py --device fake --tiny
else "$PY" scripts/count_launches.py --device cuda; fi

say "bench_train.py, bf16"
if (( DRY )); then
  "$PY" scripts/bench_train.py --device cpu --bf16 --model proxy --rounds 1 --steps 3 --warmup 1 --train-rows 32 \
    --batch-size 4 --configs ginger --output-dir "$OUT/bench_train"
else
  "$PY" scripts/bench_train.py --device cuda --bf16 --model t5-small --rounds 2 --steps 18 --warmup 2 \
    --configs ginger,ginger_empirical --output-dir "$OUT/bench_train" --json "$OUT/bench_train.json"
fi
say "gpu_check done"
