#!/usr/bin/env python
"""The protocol's table: learning rates chosen on validation rows, paired differences on test rows.

    python scripts/protocol.py --choose outputs/protocol/scratch_val.jsonl --report outputs/protocol/scratch_test.jsonl \\
        --paired ginger --target adamw

The protocol (docs/research.md, "The protocol"): every config is swept over its learning-rate grid on
all 500 validation rows (``sweep_lr.py --eval-rows 500``); the lr with the lowest mean eval loss over the
seeds run there is its choice. At that lr it runs at least 5 seeds on the 500 test rows
(``sweep_lr.py --eval-split test``). From those run files this prints, per task and model, a row per
config:

* the mean test loss over seeds, and the paired difference to ``--paired`` (same seed: same init, data
  order and sampled labels) with its 95% t-interval;
* steps and training seconds to target: where the run's eval curve (linear between evaluations) first
  reaches the ``--target`` config's final eval loss on the same seed; mean over the seeds that reach it;
* the paired difference at equal training time: both runs' eval loss at the shorter run's training seconds;
* seconds per step and optimizer state (MB).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import loss_at  # noqa: E402
from sweep_lr import read_rows  # noqa: E402


def _incomplete_beta(x: float, a: float, b: float) -> float:
    """The regularised incomplete beta function ``I_x(a, b)`` (continued fraction, modified Lentz)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _incomplete_beta(1.0 - x, b, a)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = 1.0 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1.0 - c * d) < 1e-15:
            break
    return front * (f - 1.0)


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function with ``df`` degrees of freedom."""
    tail = 0.5 * _incomplete_beta(df / (df + t * t), df / 2, 0.5)
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on ``t_cdf``), e.g. 2.776 for ``p = 0.975``, ``df = 4``."""
    if not 0 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0 < p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = -1e4, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean and its two-sided ``level`` t-interval (needs two values or more)."""
    if len(values) < 2:
        raise ValueError(f"a t-interval needs at least 2 values, got {len(values)}")
    mean = statistics.fmean(values)
    half = t_quantile(0.5 + level / 2, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def first_reach(curve: list[dict], target: float) -> tuple[float, float] | None:
    """``(step, training seconds)`` where the eval curve first reaches ``target`` (linear between evaluations)."""
    for i, point in enumerate(curve):
        if point["eval_loss"] <= target:
            if i == 0:
                return float(point["step"]), float(point["train_seconds"])
            prev = curve[i - 1]
            w = (prev["eval_loss"] - target) / (prev["eval_loss"] - point["eval_loss"])
            return (prev["step"] + w * (point["step"] - prev["step"]),
                    prev["train_seconds"] + w * (point["train_seconds"] - prev["train_seconds"]))
    return None


def _group(row: dict) -> tuple[str, str]:
    return row["task"], row.get("model", "proxy")


def choose(rows: list[dict]) -> dict[tuple[str, str, str], tuple[float, bool]]:
    """Per (task, model, config): ``(lr, at_edge)``, the lr of lowest mean eval loss over the seeds run at it;
    ``at_edge`` when it is the smallest or largest lr tried (or fewer than 3 were)."""
    losses = defaultdict(list)
    for r in rows:
        losses[(*_group(r), r["config"], r["lr"])].append(r["eval_loss"])
    by_config = defaultdict(dict)
    for (task, model, config, lr), values in losses.items():
        by_config[(task, model, config)][lr] = statistics.fmean(values)
    out = {}
    for key, means in by_config.items():
        best = min(means, key=means.get)
        out[key] = (best, len(means) < 3 or best in (min(means), max(means)))
    return out


def _fmt_interval(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:+.3f} (1 seed)" if values else ""
    mean, lo, hi = t_interval(values)
    return f"{mean:+.3f} [{lo:+.3f}, {hi:+.3f}]"


def table(choice_rows: list[dict], test_rows: list[dict], paired: str, target: str, report_split: str = "test") -> str:
    """One table per (task, model) of the test runs, each config at its chosen lr (see the module docstring).
    ``report_split="validation"`` reports on the rows the choice was made on: a check of the harness, not a result."""
    for rows, split, flag in ((choice_rows, "validation", "--choose"), (test_rows, report_split, "--report")):
        wrong = {r.get("eval_split", "validation") for r in rows} - {split}
        if wrong:
            raise ValueError(f"{flag} takes runs on {split} rows, got runs on {sorted(wrong)}")
    chosen = choose(choice_rows)
    tables = []
    for task, model in dict.fromkeys(_group(r) for r in test_rows):
        mine = [r for r in test_rows if _group(r) == (task, model)]
        runs, notes = {}, []
        for config in dict.fromkeys(r["config"] for r in mine):
            lrs = sorted({r["lr"] for r in mine if r["config"] == config})
            lr, edge = chosen.get((task, model, config), (lrs[0] if len(lrs) == 1 else None, None))
            if lr is None or lr not in lrs:
                notes.append(f"{config}: no test runs at a chosen lr (test lrs {lrs}, chosen {lr})")
                continue
            label = f"{lr:g}" + (" (edge)" if edge else "" if edge is not None else " (not chosen)")
            runs[config] = (label, {r.get("seed", 0): r for r in mine if r["config"] == config and r["lr"] == lr})
        head = (f"| {task}, {model}, {report_split} rows | lr | seeds | eval loss | minus {paired} [95% CI] "
                f"| steps to {target}'s loss "
                f"| seconds to it | minus {paired} at equal time [95% CI] | s/step | state (MB) |")
        lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
        base, goal = runs.get(paired, (None, {}))[1], runs.get(target, (None, {}))[1]
        for config, (label, seeds) in runs.items():
            diffs = [seeds[s]["eval_loss"] - base[s]["eval_loss"] for s in seeds if s in base]
            equal = []
            for s in (s for s in seeds if s in base):
                ours, theirs = seeds[s]["eval_curve"], base[s]["eval_curve"]
                if ours and theirs:
                    at = min(ours[-1]["train_seconds"], theirs[-1]["train_seconds"])
                    equal.append(loss_at(ours, at) - loss_at(theirs, at))
            reach = [first_reach(seeds[s]["eval_curve"], goal[s]["eval_loss"]) for s in seeds if s in goal]
            hit = [x for x in reach if x is not None]
            steps = (f"{statistics.fmean(x[0] for x in hit):.0f} ({len(hit)}/{len(reach)})" if hit
                     else f"never (0/{len(reach)})")
            secs = f"{statistics.fmean(x[1] for x in hit):.0f}" if hit else ""
            cells = [config, label, str(len(seeds)), f"{statistics.fmean(r['eval_loss'] for r in seeds.values()):.3f}",
                     "" if config == paired else _fmt_interval(diffs), steps if reach else "", secs,
                     "" if config == paired else _fmt_interval(equal),
                     f"{statistics.fmean(r['sec_per_step'] for r in seeds.values()):.3f}",
                     f"{statistics.fmean(r['optimizer_state_mb'] for r in seeds.values()):.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        tables.append("\n".join(lines + [f"({n})" for n in notes]))
    return "\n\n".join(tables)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--choose", nargs="+", type=Path, required=True, metavar="FILE",
                   help="run files on validation rows: each config's lr is chosen here")
    p.add_argument("--report", nargs="+", type=Path, required=True, metavar="FILE", help="run files on test rows")
    p.add_argument("--paired", default="ginger", help="the config every difference is taken against")
    p.add_argument("--target", default="adamw", help="the config whose final loss is the target")
    p.add_argument("--same-rows", action="store_true",
                   help="--report files are validation runs too (a harness check: the choice favours those rows)")
    a = p.parse_args(argv)
    print(table(read_rows(a.choose), read_rows(a.report), a.paired, a.target,
                "validation" if a.same_rows else "test"))


if __name__ == "__main__":
    main()
