#!/usr/bin/env bash
# The GPU check of the device-resident step (issue 19), one script for the day a GPU is lent (< 10 min on one):
#   1. scripts/count_launches.py --device cuda: CUDA kernels per step beside foreach AdamW (torch.profiler), each
#      optimizer's top kernels, and one step of each under torch.cuda.set_sync_debug_mode("error");
#   2. scripts/bench_step.py --only a --device cuda: step time against fused AdamW (eager and compile backends);
#   3. torch.compile of pass 1 alone, to show inductor's whole error where the compile backend falls back;
#   4. the tests that run on CUDA, on CUDA: the device path against the dense oracle and the reference
#      (tests/test_device_step.py adds "cuda" to its device list when there is one), the fake-device and
#      host-sync checks, and the exactness tests of the torch backend;
#   5. scripts/bench_train.py on a T5-small-shaped model in bf16: Trainer seconds per step, Ginger vs AdamW;
#   6. scripts/gpu_micro.py: the micro-timings of single ops that the choices in docs/performance.md rest on.
# --dry-run runs the same steps on CPU at tiny sizes (tests/test_gpu_check.py runs it in CI).
# It ran on one H200 on 2026-12-04 (README, "On a GPU"; logs in docs/gpu/).
set -uo pipefail  # each part runs under its own time limit; a failed part is reported and the rest still run
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
export PYTHONPATH="${PWD}${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
OUT=${GPU_CHECK_OUT:-outputs/gpu_check}
mkdir -p "$OUT"
FAILED=()
part() {  # part NAME SECONDS COMMAND...: one step of the check, bounded in time
  local name=$1 limit=$2; shift 2
  echo; echo "== $name ($(date -u +%H:%M:%S))"
  timeout "$limit" "$@" || { echo "!! $name failed (exit $?)"; FAILED+=("$name"); }
}

if (( DRY )); then
  DEV=cpu
  part "tests (CPU, the device path's subset)" 300 \
    "$PY" -m pytest -q -p no:cacheprovider tests/test_device_step.py -k "oracle or reference or synchronisation"
  part "count_launches.py --device fake" 120 "$PY" scripts/count_launches.py --device fake --tiny
  part "bench_step.py --only a --device cpu" 120 "$PY" scripts/bench_step.py --only a --device cpu --tiny --steps 2
  part "bench_train.py, bf16" 300 "$PY" scripts/bench_train.py --device cpu --bf16 --model proxy --rounds 1 --steps 3 \
    --warmup 1 --train-rows 32 --batch-size 4 --configs ginger --output-dir "$OUT/bench_train"
  part "gpu_micro.py" 60 "$PY" scripts/gpu_micro.py --device cpu --tiny
else
  DEV=cuda
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" || exit 1
  part "count_launches.py --device cuda (kernels, the sync check, the top kernels)" 90 \
    "$PY" scripts/count_launches.py --device cuda
  part "bench_step.py --only a --device cuda" 150 \
    "$PY" scripts/bench_step.py --only a --device cuda --steps 10 --json "$OUT/bench_step.json"
  part "torch.compile of pass 1 on CUDA (the whole error, if any)" 60 "$PY" -c "if 1:
    import torch; from ginger_hf import device_step
    m = torch.randn(64, 128, device='cuda'); U = torch.randn(4, 64, 128, device='cuda')
    torch.compile(device_step._pass1_rows, dynamic=True)(U, m, m.sin(), m.cos(), 0.1); print('pass 1 compiled')"
  part "tests on CUDA" 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_device_step.py \
    "tests/test_exactness.py::test_every_backend_matches_dense_reference"
  part "bench_train.py, T5-small shape, bf16" 110 \
    "$PY" scripts/bench_train.py --device cuda --bf16 --model t5-small --rounds 2 --steps 18 --warmup 2 \
    --configs ginger,ginger_empirical --output-dir "$OUT/bench_train" --json "$OUT/bench_train.json"
  part "gpu_micro.py" 90 "$PY" scripts/gpu_micro.py
fi
echo; echo "== gpu_check done ($(date -u +%H:%M:%S)); failed: ${FAILED[*]:-none}"
(( ${#FAILED[@]} == 0 ))
