#!/usr/bin/env python
"""Learning-rate sweeps on the proxy tasks: the evidence behind every default and lever choice.

    python scripts/sweep_lr.py --task scratch                       # the standard grid, every optimizer
    python scripts/sweep_lr.py --task lora --configs ginger,adamw --lrs 1e-3,3e-3,1e-2
    python scripts/sweep_lr.py --task finetune --configs lever:interval_1 --output outputs/final/finetune.jsonl
    python scripts/sweep_lr.py --model large --eval-split test --configs ginger,adamw --output outputs/large/scratch.jsonl

A *config* is an optimizer of ``offline_tasks.proxy.OPTIMIZERS`` (``ginger`` is the recommended
Ginger, ``ginger_paper`` the paper's configuration), or ``lever:NAME``: the recommended Ginger
with one lever changed (``LEVERS`` below; the research log in docs/research.md says why each
exists). Every run is the full task of scripts/compare.py (same model, data, steps, schedule,
seed) without ROUGE generation; each finished run appends one JSON line (config, lr, final
eval loss, eval curve, seconds per step, Ginger statistics) to ``--output``, so sweeps can be
split across processes and resumed (runs already in the file are skipped). ``--report FILE...``
prints one grid per task (config x lr, final eval loss), each config's best in bold, marked
``(edge)`` when it sits at an end of its grid.

``--model large --eval-split test`` re-checks a choice away from the tables it was made on: a T5 six times
the proxy's size (FINDINGS' 8.4M-parameter proxy), evaluated on the held-out test rows; its finetune and lora
tasks start from its own pre-trained T5, built on first use. The protocol of docs/research.md (issue 20) chooses
on ``--eval-rows 500`` validation rows and reports on the test rows with ``--lrs chosen:VALFILE`` (each config at
the lr ``scripts/protocol.py`` chooses there); ``--warmup-ratio`` runs a config with another warmup.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # offline_tasks
from offline_tasks import proxy  # noqa: E402

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

MODELS = proxy.MODELS  # T5Config overrides of each model size
DEFAULT_WARMUP = 0.05  # proxy.run's warmup ratio; a run with another gets "+warmup=R" in its config name

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


def run_key(row: dict) -> tuple:
    """What makes two runs the same run (rows from before a field existed have its default)."""
    split = row.get("eval_split", "validation")
    rows = row.get("eval_rows") or (proxy.DEFAULT_EVAL_SIZE if split == "validation" else 500)
    return (row["task"], row["config"], row["lr"], row["max_steps"], row.get("seed", 0), row.get("model", "proxy"),
            split, rows)


def done_runs(path: Path) -> set[tuple]:
    return {run_key(r) for r in read_rows([path])} if path.exists() else set()


def ensure_pretrained(model: str) -> Path:
    """The pre-trained T5 of ``model`` for finetune and lora, pre-trained now if it is not there yet (large only)."""
    path = proxy.PRETRAINED[model]
    if not (path / "config.json").exists():
        if model == "proxy":
            raise FileNotFoundError(f"the shipped pre-trained T5 is missing from {path}")
        script = Path(__file__).resolve().parent / "pretrain_t5.py"
        print(f"=== pre-training the {model} T5 once (cached in {path}) ===", flush=True)
        subprocess.run([sys.executable, str(script), "--model", model, "--output-dir", str(path)], check=True)
    return path


def read_rows(paths: list[Path]) -> list[dict]:
    """Every run of these JSON lines files."""
    return [json.loads(line) for path in paths for line in path.read_text().splitlines() if line.strip()]


def task_data(tokenizer, max_steps: int, eval_split: str = "validation", eval_rows: int | None = None) -> dict:
    """The rows a sweep run trains on (``max_steps`` batches) and evaluates on, as ``{"train", "validation"}``:
    the first ``eval_rows`` rows of ``eval_split`` (default: ``proxy.DEFAULT_EVAL_SIZE`` validation rows, or
    every held-out test row)."""
    raw = proxy.load_debsum(("train", eval_split))
    if eval_rows is None:
        eval_rows = proxy.DEFAULT_EVAL_SIZE if eval_split == "validation" else len(raw[eval_split])
    data = proxy.tokenize_splits(raw, tokenizer, {"train": min(len(raw["train"]), max_steps * proxy.DEFAULT_BATCH_SIZE),
                                                  eval_split: eval_rows})
    return {"train": data["train"], "validation": data[eval_split]}


def lrs_of(spec: str | None, task: str, model: str, configs: list[str]) -> dict[str, list[float]]:
    """Each config's learning rates: ``spec``'s list, the task's grid, or (``chosen:FILE,...``) the one
    ``protocol.choose`` picks from those validation run files."""
    if spec and spec.startswith("chosen:"):
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from protocol import choose  # the protocol's rule; imported here, as it imports this module

        choice = choose(read_rows([Path(f) for f in spec.split(":", 1)[1].split(",")]))
        missing = [c for c in configs if (task, model, c) not in choice]
        if missing:
            raise ValueError(f"--lrs {spec}: no validation runs of {missing} on {task}, {model}")
        return {c: [choice[(task, model, c)][0]] for c in configs}
    lrs = [float(x) for x in spec.split(",")] if spec else DEFAULT_LRS[task]
    return {c: lrs for c in configs}


def report(paths: list[Path], configs: list[str] | None = None) -> str:
    """``grids`` of the runs in these files."""
    return grids(read_rows(paths), configs)


def grids(rows: list[dict], configs: list[str] | None = None) -> str:
    """One grid per task: a row per config, a column per learning rate, the best of each row in bold
    (marked ``edge`` when it sits at an end of the row's grid or the row has fewer than 3 runs)."""
    tables = []
    for task in dict.fromkeys(r["task"] for r in rows):
        mine = [r for r in rows if r["task"] == task and (configs is None or r["config"] in configs)]
        lrs = sorted({r["lr"] for r in mine})
        order = configs or list(dict.fromkeys(r["config"] for r in mine))
        lines = [f"| {task} | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
        for config in order:
            runs = {r["lr"]: r["eval_loss"] for r in mine if r["config"] == config}
            if not runs:
                continue
            best = min(runs, key=runs.get)
            edge = len(runs) < 3 or best in (min(runs), max(runs))
            cells = [("" if lr not in runs else f"**{runs[lr]:.3f}**" + (" (edge)" if edge else "") if lr == best
                      else f"{runs[lr]:.3f}") for lr in lrs]
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        tables.append("\n".join(lines))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=proxy.TASKS, default="scratch")
    p.add_argument("--configs", default=None,
                   help="comma-separated optimizer names or lever:NAME (default: ginger,ginger_paper,adamw,adafactor; "
                        "with --report: every config in the files)")
    p.add_argument("--lrs", default=None, help="comma-separated learning rates (default: the task's grid), or "
                   "chosen:FILE,...: each config's choice on the validation runs in those files (scripts/protocol.py)")
    p.add_argument("--max-steps", type=int, default=proxy.DEFAULT_MAX_STEPS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", choices=sorted(MODELS), default="proxy",
                   help="model size (large: finetune and lora pre-train it on first use)")
    p.add_argument("--eval-split", choices=("validation", "test"), default="validation",
                   help="rows the eval loss is taken on (test: all 500 held-out rows)")
    p.add_argument("--eval-rows", type=int, default=None,
                   help=f"first rows of the eval split (default: {proxy.DEFAULT_EVAL_SIZE} validation rows, all test rows)")
    p.add_argument("--warmup-ratio", type=float, default=DEFAULT_WARMUP, help="share of the steps in lr warmup")
    p.add_argument("--output", type=Path, default=None, help="JSON lines file (default outputs/sweeps/TASK.jsonl)")
    p.add_argument("--report", nargs="*", type=Path, default=None, metavar="FILE",
                   help="print the grids of these JSON lines files (default: --output) and exit")
    args = p.parse_args(argv)
    output = args.output or Path("outputs/sweeps") / f"{args.task}.jsonl"
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()] if args.configs else None
    if args.report is not None:
        print(report(args.report or [output], chosen))
        return
    if not 0 <= args.warmup_ratio < 1:
        p.error(f"--warmup-ratio must be in [0, 1), got {args.warmup_ratio}")
    configs = chosen or ["ginger", "ginger_paper", "adamw", "adafactor"]
    for c in configs:
        resolve(c)  # fail before any training
    suffix = "" if args.warmup_ratio == DEFAULT_WARMUP else f"+warmup={args.warmup_ratio:g}"
    lrs = lrs_of(args.lrs, args.task, args.model, [c + suffix for c in configs])
    output.parent.mkdir(parents=True, exist_ok=True)
    pretrained = ensure_pretrained(args.model) if args.task != "scratch" else proxy.PRETRAINED[args.model]
    tokenizer = proxy.load_tokenizer()
    data = task_data(tokenizer, args.max_steps, args.eval_split, args.eval_rows)
    for config in configs:
        name, optim_args = resolve(config)
        for lr in lrs[config + suffix]:
            row = {"task": args.task, "config": config + suffix, "lr": lr, "max_steps": args.max_steps, "seed": args.seed,
                   "model": args.model, "eval_split": args.eval_split, "eval_rows": len(data["validation"]),
                   "warmup_ratio": args.warmup_ratio}
            if run_key(row) in done_runs(output):
                continue
            print(f"=== {args.task} {row['config']} lr {lr:g} seed {args.seed} ===", flush=True)
            start = time.perf_counter()
            r = proxy.run(name, lr, task=args.task, max_steps=args.max_steps, output_dir=Path("outputs/sweep_runs"),
                          data=data, tokenizer=tokenizer, rouge_size=0, seed=args.seed, disable_tqdm=True,
                          optim_args=with_stats(name, optim_args), model_overrides=MODELS[args.model],
                          warmup_ratio=args.warmup_ratio, pretrained=pretrained)
            row.update({"optim_args": r["optim_args"], **{k: r[k] for k in (
                "optimizer", "eval_loss", "sec_per_step", "eval_curve", "optimizer_state_mb", "ginger_stats")},
                "wall_seconds": time.perf_counter() - start})
            with output.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"    eval loss {r['eval_loss']:.4f}  ({r['sec_per_step']:.3f} s/step)", flush=True)


if __name__ == "__main__":
    main()
