#!/usr/bin/env bash
# Every learning-rate sweep behind README "Results" (100 runs, about 3 hours of one CPU core; lines can run in parallel),
# then the held-out check on a 6x larger T5 (16 runs of about 9 minutes; README "A larger model, held-out rows").
# Each run appends a JSON line to outputs/final/TASK.jsonl and is skipped if it is already there;
# the tables: python scripts/sweep_lr.py --report outputs/final/{scratch,finetune,lora}.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
$PY scripts/sweep_lr.py --task scratch --configs ginger --lrs 0.0003,0.001,0.003 --output outputs/final/scratch.jsonl
$PY scripts/sweep_lr.py --task scratch --configs ginger_paper --lrs 0.0003,0.001,0.003 --output outputs/final/scratch.jsonl
$PY scripts/sweep_lr.py --task scratch --configs adamw --lrs 0.0003,0.001,0.003,0.01 --output outputs/final/scratch.jsonl
$PY scripts/sweep_lr.py --task scratch --configs adafactor --lrs 0.0003,0.001,0.003,0.01 --output outputs/final/scratch.jsonl
$PY scripts/sweep_lr.py --task scratch --configs lever:tensor_blocks --lrs 0.0003,0.001,0.003 --output outputs/final/scratch.jsonl
$PY scripts/sweep_lr.py --task scratch --configs lever:empirical --lrs 0.0003,0.001,0.003 --output outputs/final/scratch.jsonl
$PY scripts/sweep_lr.py --task finetune --configs ginger --lrs 0.001,0.003,0.01 --output outputs/final/finetune.jsonl
$PY scripts/sweep_lr.py --task finetune --configs ginger_paper --lrs 0.0003,0.001,0.003 --output outputs/final/finetune.jsonl
$PY scripts/sweep_lr.py --task finetune --configs adamw --lrs 0.0001,0.0003,0.001,0.003,0.01 --output outputs/final/finetune.jsonl
$PY scripts/sweep_lr.py --task finetune --configs adafactor --lrs 0.0003,0.001,0.003,0.01 --output outputs/final/finetune.jsonl
$PY scripts/sweep_lr.py --task finetune --configs lever:tensor_blocks --lrs 0.0003,0.001,0.003,0.01 --output outputs/final/finetune.jsonl
$PY scripts/sweep_lr.py --task finetune --configs lever:empirical --lrs 0.001,0.003,0.01 --output outputs/final/finetune.jsonl
$PY scripts/sweep_lr.py --task lora --configs ginger --lrs 0.001,0.003,0.01 --output outputs/final/lora.jsonl
$PY scripts/sweep_lr.py --task lora --configs ginger_paper --lrs 0.0003,0.001,0.003,0.01 --output outputs/final/lora.jsonl
$PY scripts/sweep_lr.py --task lora --configs adamw --lrs 0.0003,0.001,0.003,0.01 --output outputs/final/lora.jsonl
$PY scripts/sweep_lr.py --task lora --configs adafactor --lrs 0.001,0.003,0.01,0.03 --output outputs/final/lora.jsonl
$PY scripts/sweep_lr.py --task lora --configs lever:tensor_blocks --lrs 0.0003,0.001,0.003,0.01 --output outputs/final/lora.jsonl
$PY scripts/sweep_lr.py --task lora --configs lever:empirical --lrs 0.001,0.003,0.01 --output outputs/final/lora.jsonl
# Seeds 1 to 4 at seed 0's best learning rates (README "Seeds"); each seed its own file
for SEED in 1 2 3 4; do
  $PY scripts/sweep_lr.py --task scratch --configs ginger --lrs 1e-3 --seed $SEED --output outputs/final/seed${SEED}_scratch.jsonl
  $PY scripts/sweep_lr.py --task scratch --configs adamw,adafactor --lrs 3e-3 --seed $SEED --output outputs/final/seed${SEED}_scratch.jsonl
  $PY scripts/sweep_lr.py --task finetune --configs ginger,adamw,adafactor --lrs 3e-3 --seed $SEED --output outputs/final/seed${SEED}_finetune.jsonl
  $PY scripts/sweep_lr.py --task lora --configs ginger,adamw --lrs 3e-3 --seed $SEED --output outputs/final/seed${SEED}_lora.jsonl
  $PY scripts/sweep_lr.py --task lora --configs adafactor --lrs 1e-2 --seed $SEED --output outputs/final/seed${SEED}_lora.jsonl
done
# The held-out check: FINDINGS' 8.4M-parameter T5 from scratch, eval loss on the 500 test rows, nothing tuned for it
L="$PY scripts/sweep_lr.py --model large --eval-split test"
$L --configs ginger,adamw --lrs 0.0003,0.001,0.003 --output outputs/large/scratch.jsonl
$L --configs adafactor --lrs 0.0003,0.001,0.003,0.01 --output outputs/large/scratch.jsonl
for SEED in 1 2; do
  $L --configs ginger,adamw,adafactor --lrs 0.001 --seed $SEED --output outputs/large/seed${SEED}_scratch.jsonl
done
