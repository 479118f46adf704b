#!/usr/bin/env bash
# The prototype sweeps behind docs/research.md, "After the final sweeps" (about 2.5 hours of one CPU core; lines can
# run in parallel). Each run appends a JSON line (skipped if already there); the tables:
#   python scripts/explore_variants.py --report outputs/explore/{scratch,finetune,lora}.jsonl
#   python scripts/sweep_lr.py --report outputs/explore/tau8_{scratch,finetune,lora}.jsonl
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
X="$PY scripts/explore_variants.py"
$X --task scratch --variant none --lrs 1e-3
$X --task finetune --variant none --lrs 3e-3
$X --task lora --variant none --lrs 3e-3
$X --task scratch --variant graft_tensor --lrs 3e-4,1e-3,3e-3,1e-2
$X --task finetune --variant graft_tensor --lrs 1e-3,3e-3,1e-2
$X --task lora --variant graft_tensor --lrs 1e-3,3e-3,1e-2
$X --task scratch --variant graft_row --lrs 1e-3,3e-3,1e-2
$X --task finetune --variant graft_row --lrs 1e-3,3e-3,1e-2,3e-2
$X --task lora --variant graft_row --lrs 1e-3,3e-3,1e-2
$X --task finetune --variant graft_block --lrs 1e-3,3e-3,1e-2
$X --task scratch --variant memory_in_steps --lrs 3e-4,1e-3,3e-3
$X --task finetune --variant memory_in_steps --lrs 1e-3,3e-3,1e-2
$X --task lora --variant memory_in_steps --lrs 1e-3,3e-3,1e-2
$X --task scratch --variant adam_coordinates --lrs 3e-4,1e-3,3e-3
$X --task finetune --variant adam_coordinates --lrs 1e-3,3e-3,1e-2
$X --task lora --variant adam_coordinates --lrs 1e-3,3e-3,1e-2
for SEED in 1 2; do
  $X --task scratch --variant none --lrs 1e-3 --seed $SEED
  $X --task scratch --variant graft_tensor --lrs 3e-3 --seed $SEED
  $X --task scratch --variant graft_row --lrs 3e-3 --seed $SEED
  $X --task finetune --variant none --lrs 3e-3 --seed $SEED
  $X --task finetune --variant graft_tensor --lrs 3e-3 --seed $SEED
  $X --task finetune --variant memory_in_steps --lrs 3e-3 --seed $SEED
  $X --task lora --variant none --lrs 3e-3 --seed $SEED
  $X --task lora --variant graft_tensor --lrs 3e-3 --seed $SEED
  $X --task lora --variant graft_row --lrs 3e-3 --seed $SEED
  $X --task scratch --variant adam_coordinates --lrs 1e-3 --seed $SEED
  $X --task finetune --variant adam_coordinates --lrs 3e-3 --seed $SEED
  $X --task lora --variant adam_coordinates --lrs 3e-3 --seed $SEED
done
for SEED in 3 4; do
  $X --task scratch --variant none --lrs 1e-3 --seed $SEED
  $X --task scratch --variant graft_tensor --lrs 3e-3 --seed $SEED
done
# Rank 8 is an argument (tau=8): the product's own step; compare with outputs/final's ginger rows
S="$PY scripts/sweep_lr.py --configs lever:tau_8"
$S --task scratch --lrs 3e-4,1e-3,3e-3 --output outputs/explore/tau8_scratch.jsonl
$S --task finetune --lrs 1e-3,3e-3,1e-2 --output outputs/explore/tau8_finetune.jsonl
$S --task lora --lrs 1e-3,3e-3,1e-2 --output outputs/explore/tau8_lora.jsonl
for SEED in 1 2; do
  $S --task finetune --lrs 3e-3 --seed $SEED --output outputs/explore/tau8_seed${SEED}_finetune.jsonl
done
