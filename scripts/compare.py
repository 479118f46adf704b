#!/usr/bin/env python
"""The main job: Ginger against first-order optimizers on the offline proxy tasks.

    python scripts/compare.py                                  # offline default: scratch, ginger vs adamw
    python scripts/compare.py --task finetune --optimizers ginger,ginger_paper,adamw,adafactor
    python scripts/compare.py --task lora --output-dir outputs/compare_lora
    python scripts/compare.py --task vision --optimizers ginger,ginger_paper,adamw,sgd   # images: digits

Tasks (``offline_tasks.proxy.TASKS``): ``scratch`` trains a fresh small T5; ``finetune`` and
``lora`` start from the span-corruption pre-trained one (``scripts/pretrain_t5.py``), fully
or with LoRA through peft. ``vision`` trains a small ResNet on scikit-learn's bundled digits
(``offline_tasks.vision``; eval loss and accuracy, no ROUGE). Each optimizer gets the same seed, init, data order, steps and
lr schedule, at its learning rate for the task (``offline_tasks.proxy.TASK_LR``, picked by
scripts/sweep_lr.py), with the stock Seq2SeqTrainer; then eval loss on the validation
sample, and ROUGE of greedy generations on its first ``--rouge-size`` rows. Writes
``report.json`` (one object per optimizer), ``report.md`` (the table, also printed) and
``curves.png`` (eval loss against step and against training wall time) to ``--output-dir``.
The table's "at equal time" column is each optimizer's eval loss when the fastest one had
finished (linear between its evaluations, every tenth of the run).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the network
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
# One thread unless the caller says otherwise: this model's ops are small, and on a shared
# 2-core machine two threads per process were ~5x slower (threads wait on each other).
os.environ.setdefault("OMP_NUM_THREADS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # offline_tasks
from ginger_hf import kernel  # noqa: E402
from offline_tasks import proxy, vision  # noqa: E402

TINY_MODEL = dict(d_model=64, d_kv=16, d_ff=128, num_layers=1, num_decoder_layers=1, num_heads=4)
COLUMNS = [("optimizer", "optimizer", "{}"), ("lr", "lr", "{:g}"), ("eval loss", "eval_loss", "{:.3f}"),
           ("at equal time", "eval_loss_at_equal_time", "{:.3f}"),
           ("ROUGE-1", "rouge1", "{:.2f}"), ("ROUGE-2", "rouge2", "{:.2f}"), ("ROUGE-L", "rougeL", "{:.2f}"),
           ("s/step", "sec_per_step", "{:.3f}"), ("optimizer state (MB)", "optimizer_state_mb", "{:.1f}")]


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]] = COLUMNS) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt.format(row[key]) for _, key, fmt in columns) + " |" for row in rows]
    return "\n".join(lines)


def loss_at(curve: list[dict], seconds: float) -> float:
    """Eval loss at ``seconds`` of training, linear between evaluations (the last one past the end)."""
    for a, b in zip(curve, curve[1:]):
        if b["train_seconds"] >= seconds:
            w = (seconds - a["train_seconds"]) / max(b["train_seconds"] - a["train_seconds"], 1e-12)
            return a["eval_loss"] + min(max(w, 0.0), 1.0) * (b["eval_loss"] - a["eval_loss"])
    return curve[-1]["eval_loss"]


def plot_curves(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for row in rows:
        curve = row["eval_curve"]
        label = f"{row['optimizer']} (lr {row['lr']:g})"
        by_step.plot([p["step"] for p in curve], [p["eval_loss"] for p in curve], marker="o", label=label)
        by_time.plot([p["train_seconds"] for p in curve], [p["eval_loss"] for p in curve], marker="o", label=label)
    by_step.set(xlabel="optimizer step", ylabel="eval loss (cross-entropy)", title="eval loss vs step")
    by_time.set(xlabel="training wall time (s, evaluation excluded)", title="eval loss vs wall time")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_names(text: str, known: dict) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if not names or bad:
        raise ValueError(f"--optimizers: unknown {bad or names}; choose from {sorted(known)}")
    return names


def parse_lrs(items: list[str], known: dict = proxy.OPTIMIZERS) -> dict[str, float]:
    lrs = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in known:
            raise ValueError(f"--lr takes NAME=VALUE with NAME in {sorted(known)}, got {item!r}")
        lrs[name] = float(value)
    return lrs


def compare_all(args, names: list[str], lrs: dict[str, float], run_one, columns, describe) -> list[dict]:
    """Run each optimizer in turn (``run_one(name, lr)`` returns its report row), then write report.json,
    report.md (the table, and ``describe(rows, budget, total)`` under it), curves.png, and print the table."""
    args.output_dir.mkdir(parents=True, exist_ok=True)
    if any(n.startswith("ginger") for n in names):
        kernel.available()  # build Ginger's CPU kernel (first use only) before any clock starts
    rows, start = [], time.perf_counter()
    for name in names:
        print(f"\n=== {args.task}: {name} (lr {lrs[name]:g}) ===", flush=True)
        rows.append(run_one(name, lrs[name]))
    total = time.perf_counter() - start
    budget = min(r["train_seconds"] for r in rows)
    for r in rows:
        r["eval_loss_at_equal_time"] = loss_at(r["eval_curve"], budget)

    (args.output_dir / "report.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows, columns)
    (args.output_dir / "report.md").write_text(f"{table}\n\n{describe(rows, budget, total)}\n")
    plot_curves(rows, args.output_dir / "curves.png")
    print("\n" + table)
    print(f"\nwrote {args.output_dir}/report.json, report.md, curves.png ({total:.0f} s in all)")
    return rows


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=(*proxy.TASKS, "vision"), default="scratch")
    p.add_argument("--optimizers", default="ginger,adamw",
                   help=f"comma-separated, from {sorted(proxy.OPTIMIZERS)} (default: ginger,adamw)")
    p.add_argument("--max-steps", type=int, default=proxy.DEFAULT_MAX_STEPS)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/compare"))
    p.add_argument("--lr", action="append", default=[], metavar="NAME=VALUE",
                   help="override an optimizer's default learning rate (repeatable)")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"default {proxy.DEFAULT_BATCH_SIZE} (T5 tasks), {vision.DEFAULT_BATCH_SIZE} (vision)")
    p.add_argument("--epochs", type=int, default=vision.DEFAULT_EPOCHS, help="vision: epochs (replaces --max-steps)")
    p.add_argument("--eval-size", type=int, default=proxy.DEFAULT_EVAL_SIZE, help="validation rows for eval loss")
    p.add_argument("--rouge-size", type=int, default=proxy.DEFAULT_ROUGE_SIZE, help="validation rows generated for ROUGE")
    p.add_argument("--eval-steps", type=int, default=None, help="default: max-steps / 10")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="a 1+1-layer d_model 64 T5 (for tests and smoke runs)")
    p.add_argument("--pretrained", type=Path, default=proxy.PRETRAINED_DIR,
                   help="the pre-trained T5 of the finetune and lora tasks (scripts/pretrain_t5.py)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.task == "vision":
        return main_vision(args)
    args.batch_size = args.batch_size or proxy.DEFAULT_BATCH_SIZE
    names = parse_names(args.optimizers, proxy.OPTIMIZERS)
    if args.max_steps < 1:
        raise ValueError(f"--max-steps must be >= 1, got {args.max_steps}")
    lrs = {**proxy.TASK_LR[args.task], **parse_lrs(args.lr)}
    unset = [n for n in names if n not in lrs]
    if unset:  # the peers have no swept lr yet (scripts/protocol.py chooses one)
        raise ValueError(f"no learning rate for {unset} on task {args.task}: pass --lr NAME=VALUE")

    tokenizer = proxy.load_tokenizer()
    raw = proxy.load_debsum()
    train_rows = min(len(raw["train"]), args.max_steps * args.batch_size)
    data = proxy.tokenize_splits(raw, tokenizer, {"train": train_rows, "validation": args.eval_size})

    def run_one(name: str, lr: float) -> dict:
        return proxy.run(name, lr, task=args.task, max_steps=args.max_steps, output_dir=args.output_dir / name,
                         data=data, tokenizer=tokenizer, batch_size=args.batch_size, eval_steps=args.eval_steps,
                         rouge_size=args.rouge_size, seed=args.seed, model_overrides=TINY_MODEL if args.tiny else None,
                         pretrained=args.pretrained)

    def describe(rows: list[dict], budget: float, total: float) -> str:
        return (f"Task {args.task}: {args.max_steps} steps, batch {args.batch_size}, "
                f"{rows[0]['num_parameters'] / 1e6:.1f}M-parameter T5 ({rows[0]['trainable_parameters'] / 1e6:.2f}M "
                f"trained), eval loss on {args.eval_size} validation rows (at equal time: after {budget:.0f} s of "
                f"training), ROUGE on {args.rouge_size}; total {total:.0f} s.")

    return compare_all(args, names, lrs, run_one, COLUMNS, describe)


VISION_COLUMNS = [("optimizer", "optimizer", "{}"), ("lr", "lr", "{:g}"), ("eval accuracy", "eval_accuracy", "{:.4f}"),
                  ("eval loss", "eval_loss", "{:.3f}"), ("at equal time", "eval_loss_at_equal_time", "{:.3f}"),
                  ("s/step", "sec_per_step", "{:.3f}"), ("optimizer state (MB)", "optimizer_state_mb", "{:.2f}")]
TINY_RESNET = dict(depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8)


def main_vision(args) -> list[dict]:
    """``--task vision``: the digits ResNet (``offline_tasks.vision``), same report files and plot."""
    names = parse_names(args.optimizers, vision.OPTIMIZERS)
    if args.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {args.epochs}")
    lrs = {**vision.TASK_LR, **parse_lrs(args.lr, vision.OPTIMIZERS)}
    batch_size = args.batch_size or vision.DEFAULT_BATCH_SIZE
    data = vision.load_digits()

    def run_one(name: str, lr: float) -> dict:
        return vision.run(name, lr, data=data, output_dir=args.output_dir / name, epochs=args.epochs,
                          batch_size=batch_size, seed=args.seed, model_overrides=TINY_RESNET if args.tiny else None)

    def describe(rows: list[dict], budget: float, total: float) -> str:
        return (f"Task vision: digits, {args.epochs} epochs ({rows[0]['max_steps']} steps) of batch {batch_size}, a "
                f"{rows[0]['num_parameters'] / 1e3:.0f}k-parameter ResNet, seed {args.seed}; eval on "
                f"{vision.DIGITS_EVAL_SIZE} held-out images (at equal time: after {budget:.0f} s of training); "
                f"total {total:.0f} s.")

    return compare_all(args, names, lrs, run_one, VISION_COLUMNS, describe)


if __name__ == "__main__":
    main()
