#!/usr/bin/env python
"""The learning-rate sweep behind ``ginger_hf.proxy.DEFAULT_LR`` (the main job's defaults).

    python scripts/sweep_lr.py                      # ginger, adamw, adafactor: 3 lrs each
    python scripts/sweep_lr.py --grid ginger=1e-4,3e-4 --max-steps 300

Same proxy task, model, data, schedule and seed as scripts/compare.py, but a third of the
steps (100) and no generation, to keep the sweep short; ranks each learning rate by
its final eval loss. Writes
``sweep.json`` and ``sweep.md`` to ``--output-dir`` and prints the table with the best
learning rate per optimizer.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread unless the caller says otherwise: this model's ops are small, and on a shared
# 2-core machine two threads per process were ~5x slower (threads wait on each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from ginger_hf import proxy  # noqa: E402

DEFAULT_GRID = {"ginger": [3e-4, 1e-3, 3e-3], "adamw": [1e-3, 3e-3, 1e-2], "adafactor": [3e-4, 1e-3, 3e-3]}


def parse_grid(items: list[str]) -> dict[str, list[float]]:
    grid = {}
    for item in items:
        name, sep, values = item.partition("=")
        if not sep or name not in proxy.OPTIMIZERS:
            raise ValueError(f"--grid takes NAME=LR,LR,... with NAME in {sorted(proxy.OPTIMIZERS)}, got {item!r}")
        grid[name] = [float(v) for v in values.split(",") if v]
    return grid


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grid", action="append", default=[], metavar="NAME=LR,LR,...",
                   help=f"learning rates per optimizer (repeatable; default {DEFAULT_GRID})")
    p.add_argument("--max-steps", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=proxy.DEFAULT_BATCH_SIZE)
    p.add_argument("--eval-size", type=int, default=proxy.DEFAULT_EVAL_SIZE)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/sweep_lr"))
    args = p.parse_args(argv)
    grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
    args.output_dir.mkdir(parents=True, exist_ok=True)

    tokenizer = proxy.load_tokenizer()
    raw = proxy.load_debsum()
    data = proxy.tokenize_splits(raw, tokenizer, {"train": min(len(raw["train"]), args.max_steps * args.batch_size),
                                                  "validation": args.eval_size})
    rows, start = [], time.perf_counter()
    for name, lrs in grid.items():
        for lr in lrs:
            print(f"\n=== {name} lr {lr:g} ===", flush=True)
            r = proxy.run(name, lr, max_steps=args.max_steps, output_dir=args.output_dir / f"{name}_{lr:g}", data=data,
                          tokenizer=tokenizer, batch_size=args.batch_size, eval_steps=args.max_steps, rouge_size=0, seed=args.seed,
                          disable_tqdm=True)
            rows.append({k: r[k] for k in ("optimizer", "lr", "eval_loss", "sec_per_step", "eval_curve")})
    best = {name: min((r for r in rows if r["optimizer"] == name), key=lambda r: r["eval_loss"])["lr"] for name in grid}
    lines = ["| optimizer | lr | eval loss | s/step | best |", "|---|---|---|---|---|"]
    lines += [f"| {r['optimizer']} | {r['lr']:g} | {r['eval_loss']:.3f} | {r['sec_per_step']:.3f} | "
              f"{'yes' if best[r['optimizer']] == r['lr'] else ''} |" for r in rows]
    table = "\n".join(lines)
    (args.output_dir / "sweep.json").write_text(json.dumps({"best_lr": best, "runs": rows}, indent=2))
    (args.output_dir / "sweep.md").write_text(
        f"{table}\n\n{args.max_steps} steps, batch {args.batch_size}, eval loss on {args.eval_size} validation rows, "
        f"seed {args.seed}; {time.perf_counter() - start:.0f} s in all.\n")
    print("\n" + table + f"\n\nbest lr: {best}")
    return rows


if __name__ == "__main__":
    main()
