#!/usr/bin/env python
"""Learning-rate sweeps on the proxy tasks: the evidence behind every default and lever choice.

    python scripts/sweep_lr.py --task scratch                       # the standard grid, every optimizer
    python scripts/sweep_lr.py --task lora --configs ginger,adamw --lrs 1e-3,3e-3,1e-2
    python scripts/sweep_lr.py --task finetune --configs lever:interval_1 --output outputs/final/finetune.jsonl

A *config* is an optimizer of ``ginger_hf.proxy.OPTIMIZERS`` (``ginger`` is the recommended
Ginger, ``ginger_paper`` the paper's configuration), or ``lever:NAME``: the recommended Ginger
with one lever changed (``LEVERS`` below; the research log in docs/research.md says why each
exists). Every run is the full task of scripts/compare.py (same model, data, steps, schedule,
seed) without ROUGE generation; each finished run appends one JSON line (config, lr, final
eval loss, eval curve, seconds per step, Ginger statistics) to ``--output``, so sweeps can be
split across processes and resumed (runs already in the file are skipped). ``--report``
prints the table of a file: per config, each lr's final eval loss, the best marked, and
whether the best sits at an edge of the grid.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from ginger_hf import proxy  # noqa: E402

# One lever changed from the recommended configuration (what each tests: docs/research.md).
LEVERS: dict[str, str] = {
    "tensor_blocks": "blocks=tensor",
    "power_1": "power=1",
    "lambda_0.03": "relative_damping=0.03",
    "lambda_0.3": "relative_damping=0.3",
    "empirical": "curvature=empirical",
    "interval_1": "curvature_interval=1",
    "interval_2": "curvature_interval=2",
    "interval_8": "curvature_interval=8",
    "tau_8": "tau=8",
    "sqrt_scale": "curvature_scale=sqrt",
    "no_bias_correction": "bias_correction=false",
}

DEFAULT_LRS = {"scratch": [3e-4, 1e-3, 3e-3, 1e-2], "finetune": [3e-4, 1e-3, 3e-3, 1e-2],
               "lora": [1e-3, 3e-3, 1e-2, 3e-2]}


def resolve(config: str) -> tuple[str, str | None]:
    """``(optimizer name, optim_args or None)`` of a config."""
    if config.startswith("lever:"):
        name = config.split(":", 1)[1]
        if name not in LEVERS:
            raise ValueError(f"unknown lever {name!r}; choose from {sorted(LEVERS)}")
        return "ginger", LEVERS[name]
    if config.startswith("args:"):  # ad-hoc optim_args for exploration: args:KEY=V;KEY=V (';' for ',')
        return "ginger", config.split(":", 1)[1].replace(";", ",")
    if config not in proxy.OPTIMIZERS:
        raise ValueError(f"unknown config {config!r}; choose from {sorted(proxy.OPTIMIZERS)} or lever:NAME")
    return config, None


def with_stats(name: str, optim_args: str | None) -> str | None:
    """Ginger runs log their statistics (clipped fraction, share in span(U), update/gradient norm)."""
    if proxy.OPTIMIZERS[name].get("optim") != "ginger":
        return optim_args
    base = optim_args if optim_args is not None else proxy.OPTIMIZERS[name].get("optim_args", "")
    return base if "log_stats" in base else ",".join(x for x in (base, "log_stats=true") if x)


def done_runs(path: Path) -> set[tuple[str, str, float, int]]:
    if not path.exists():
        return set()
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {(r["task"], r["config"], r["lr"], r["max_steps"]) for r in rows}


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    lines = ["| task | config | lr | eval loss | s/step | best |", "|---|---|---|---|---|---|"]
    for task in dict.fromkeys(r["task"] for r in rows):
        for config in dict.fromkeys(r["config"] for r in rows if r["task"] == task):
            runs = sorted((r for r in rows if r["task"] == task and r["config"] == config), key=lambda r: r["lr"])
            best = min(runs, key=lambda r: r["eval_loss"])
            edge = len(runs) < 3 or best is runs[0] or best is runs[-1]
            for r in runs:
                mark = ("**best**" + (" (edge)" if edge else "")) if r is best else ""
                lines.append(f"| {task} | {config} | {r['lr']:g} | {r['eval_loss']:.3f} | {r['sec_per_step']:.3f} | {mark} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=proxy.TASKS, default="scratch")
    p.add_argument("--configs", default="ginger,ginger_paper,adamw,adafactor",
                   help="comma-separated optimizer names or lever:NAME")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the task's grid)")
    p.add_argument("--max-steps", type=int, default=proxy.DEFAULT_MAX_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON lines file (default outputs/sweeps/TASK.jsonl)")
    p.add_argument("--report", action="store_true", help="print the table of --output and exit")
    args = p.parse_args(argv)
    output = args.output or Path("outputs/sweeps") / f"{args.task}.jsonl"
    if args.report:
        print(report(output))
        return
    lrs = [float(x) for x in args.lrs.split(",")] if args.lrs else DEFAULT_LRS[args.task]
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    for c in configs:
        resolve(c)  # fail before any training
    output.parent.mkdir(parents=True, exist_ok=True)
    tokenizer = proxy.load_tokenizer()
    raw = proxy.load_debsum()
    data = proxy.tokenize_splits(raw, tokenizer, {"train": min(len(raw["train"]), args.max_steps * proxy.DEFAULT_BATCH_SIZE),
                                                  "validation": proxy.DEFAULT_EVAL_SIZE})
    for config in configs:
        name, optim_args = resolve(config)
        for lr in lrs:
            if (args.task, config, lr, args.max_steps) in done_runs(output):
                continue
            print(f"=== {args.task} {config} lr {lr:g} ===", flush=True)
            start = time.perf_counter()
            r = proxy.run(name, lr, task=args.task, max_steps=args.max_steps, output_dir=Path("outputs/sweep_runs"),
                          data=data, tokenizer=tokenizer, rouge_size=0, seed=args.seed, disable_tqdm=True,
                          optim_args=with_stats(name, optim_args))
            row = {"task": args.task, "config": config, "optim_args": r["optim_args"], **{k: r[k] for k in (
                "optimizer", "lr", "max_steps", "eval_loss", "sec_per_step", "eval_curve", "optimizer_state_mb",
                "ginger_stats")}, "wall_seconds": time.perf_counter() - start}
            with output.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"    eval loss {r['eval_loss']:.4f}  ({r['sec_per_step']:.3f} s/step)", flush=True)


if __name__ == "__main__":
    main()
