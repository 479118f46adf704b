#!/usr/bin/env bash
# The protocol of docs/research.md ("The protocol"): Ginger against its peers on the 8.4M T5 from scratch, fine-tuned
# and with LoRA (MODEL=proxy: the 1.4M tasks, the fast main job). Per task: (1) every config's lr grid on all 500
# validation rows, seed 0; (2) five seeds on the 500 test rows, each config at the lr chosen in (1); (3) the table.
# Each run appends a JSON line and is skipped if it is already there, so lines can run in parallel and resume.
# Cost on one CPU core: an 8.4M run is about 8 minutes, (1) + (2) about 80 runs per task; a 1.4M run about 1.5 minutes.
# A best at the edge of its grid (`python scripts/sweep_lr.py --report FILE` marks it) gets the grid extended before (2).
# finetune and lora pre-train the 8.4M T5 once on first use (scripts/pretrain_t5.py --model large).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
MODEL=${MODEL:-large}
O=outputs/protocol
CONFIGS=ginger,adamw,adamw_b2_0.95,adamw_b2_0.999,schedule_free_adamw,adam_mini,muon,soap
for TASK in ${TASKS:-scratch finetune lora}; do
  VAL=$O/${MODEL}_${TASK}_val.jsonl
  TEST=$O/${MODEL}_${TASK}_test.jsonl
  V="$PY scripts/sweep_lr.py --model $MODEL --task $TASK --eval-rows 500 --output $VAL"
  # LoRA's adapters take learning rates about 3x higher (README, "Learning-rate sweeps")
  if [ "$TASK" = lora ]; then X=3; else X=1; fi
  grid() { $PY -c "import sys; print(','.join(f'{float(v) * $X:g}' for v in sys.argv[1:]))" "$@"; }
  # (1) grids a factor of 2 apart around each optimizer's best on the 8.4M scratch task so far (README; issue 20)
  $V --configs ginger --lrs "$(grid 2.5e-4 5e-4 1e-3 2e-3 4e-3)"
  $V --configs adamw,adamw_b2_0.95,adamw_b2_0.999,schedule_free_adamw,adam_mini --lrs "$(grid 5e-4 1e-3 2e-3 4e-3)"
  $V --configs muon --lrs "$(grid 2.5e-3 5e-3 1e-2 2e-2)"
  $V --configs soap --lrs "$(grid 1e-3 2e-3 4e-3 8e-3)"
  # AdamW's warmup tuned too (the runs above: 5%), over the same grid
  for W in 0 0.1 0.2; do $V --configs adamw --warmup-ratio $W --lrs "$(grid 5e-4 1e-3 2e-3 4e-3)"; done
  # (2) five seeds on the test rows at the chosen lrs
  for SEED in 0 1 2 3 4; do
    $PY scripts/sweep_lr.py --model $MODEL --task $TASK --eval-split test --seed $SEED --configs $CONFIGS \
      --lrs chosen:$VAL --output $TEST
    for W in 0 0.1 0.2; do
      $PY scripts/sweep_lr.py --model $MODEL --task $TASK --eval-split test --seed $SEED --configs adamw \
        --warmup-ratio $W --lrs chosen:$VAL --output $TEST
    done
  done
  # (3) the table
  $PY scripts/protocol.py --choose $VAL --report $TEST --paired ginger --target adamw
done
