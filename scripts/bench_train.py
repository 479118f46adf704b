"""Seconds per Trainer step on the main job's model: AdamW vs Ginger (recommended, mc every step, empirical, paper).

Uses the proxy task of scripts/compare.py (``offline_tasks.proxy``: the from-scratch T5 on the
bundled debsum sample, stock ``Seq2SeqTrainer``, ``--optim ginger``). Configurations run in
alternating rounds in one process (the machine is shared: alternation spreads load evenly),
each round a fresh Trainer for ``--steps`` optimizer steps; a step is timed from
``on_step_begin`` to ``on_step_end`` (forward, curvature pass, backward, clipping, optimizer
step), the first ``--warmup`` steps of each round are dropped. Reported: the mean over all
timed steps (what a run costs: steps that refresh the curvature model, with their extra
backward, and steps that do not, in their proportion; make ``--steps - --warmup`` a
multiple of the curvature interval), its ratio to AdamW's, and the median.

    python scripts/bench_train.py                      # defaults: 3 rounds x 18 steps
    python scripts/bench_train.py --rounds 5 --steps 26 --json outputs/bench_train.json
    python scripts/bench_train.py --configs ginger,ginger_interval_8      # AdamW always runs
    python scripts/bench_train.py --device cuda --bf16 --model t5-small --rounds 1   # scripts/gpu_check.sh
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time
from pathlib import Path

import torch
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

import ginger_hf  # noqa: F401  (registers --optim ginger)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # offline_tasks
from offline_tasks import proxy  # noqa: E402

CONFIGS = {
    "adamw_fused": dict(optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.99),
    "ginger": dict(optim="ginger"),  # the recommended configuration: mc curvature every 4 steps
    "ginger_interval_1": dict(optim="ginger", optim_args="curvature_interval=1"),
    "ginger_interval_2": dict(optim="ginger", optim_args="curvature_interval=2"),
    "ginger_interval_8": dict(optim="ginger", optim_args="curvature_interval=8"),
    "ginger_empirical": dict(optim="ginger", optim_args="curvature=empirical"),
    "ginger_paper": dict(optim="ginger", optim_args="preset=paper"),
}
LIMITS = {"ginger": 1.3}
# T5-small's shape (60.5M parameters with its 32k vocabulary; the bundled tokenizer's vocabulary is smaller).
MODELS = {"proxy": {}, "t5-small": dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                                        num_heads=8)}


class StepClock(TrainerCallback):
    """Wall seconds of each optimizer step (forward + backward(s) + clip + step)."""

    def __init__(self):
        self.times, self._t = [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self._t = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self._t)


def one_round(name: str, data, tokenizer, steps: int, batch_size: int, out_dir: Path, device: str = "cpu",
              bf16: bool = False, shape: str = "proxy") -> list[float]:
    model = proxy.build_model(tokenizer, seed=0, **MODELS[shape])
    args = Seq2SeqTrainingArguments(
        output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size, learning_rate=1e-3,
        lr_scheduler_type="constant", max_grad_norm=1.0, seed=0, data_seed=0, train_sampling_strategy="group_by_length",
        eval_strategy="no", save_strategy="no", report_to="none", use_cpu=device == "cpu", bf16=bf16,
        dataloader_num_workers=0, disable_tqdm=True, logging_strategy="no", **CONFIGS[name],
    )
    clock = StepClock()
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data["train"],
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
                             callbacks=[clock])
    trainer.train()
    return clock.times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=18, help="optimizer steps per round (warmup + a multiple of 8)")
    p.add_argument("--warmup", type=int, default=2, help="steps dropped at the start of each round")
    p.add_argument("--batch-size", type=int, default=proxy.DEFAULT_BATCH_SIZE)
    p.add_argument("--train-rows", type=int, default=2000)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--configs", default=",".join(CONFIGS),
                   help=f"comma-separated subset of: {', '.join(CONFIGS)} (AdamW always runs: it is the unit)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision (the Trainer's --bf16)")
    p.add_argument("--model", choices=tuple(MODELS), default="proxy", help="proxy: the main job's T5; t5-small: its shape")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--output-dir", type=Path, default=Path("outputs/bench_train"))
    a = p.parse_args(argv)
    if a.steps <= a.warmup:
        raise ValueError(f"--steps must exceed --warmup, got steps={a.steps}, warmup={a.warmup}")
    names = ["adamw_fused"] + [n for n in dict.fromkeys(a.configs.split(",")) if n != "adamw_fused"]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise ValueError(f"--configs: unknown {unknown}; choose from {list(CONFIGS)}")
    if a.threads:
        torch.set_num_threads(a.threads)
    tokenizer = proxy.load_tokenizer()
    data = proxy.tokenize_splits(proxy.load_debsum(("train",)), tokenizer, {"train": a.train_rows})
    n_params = sum(p.numel() for p in proxy.build_model(tokenizer, **MODELS[a.model]).parameters())
    print(f"model: offline_tasks.proxy T5, {a.model} shape ({n_params / 1e6:.2f}M parameters), batch {a.batch_size}, "
          f"device {a.device}{', bf16' if a.bf16 else ''}, threads {torch.get_num_threads()}, "
          f"load at start {os.getloadavg()}")
    times = {name: [] for name in names}
    loads = []
    for r in range(a.rounds):
        order = names if r % 2 == 0 else names[::-1]  # alternate the order too
        for name in order:
            t = one_round(name, data, tokenizer, a.steps, a.batch_size, a.output_dir, a.device, a.bf16, a.model)
            times[name] += t[a.warmup:]
            loads.append(os.getloadavg()[0])
            print(f"  round {r + 1} {name:18s} median {statistics.median(t[a.warmup:]):.3f} s/step  "
                  f"(load {loads[-1]:.2f})", flush=True)
    base, base_med = statistics.fmean(times["adamw_fused"]), statistics.median(times["adamw_fused"])
    rows = []
    # The mean is what a run costs; the median ratio stands beside it because one slow round moves the mean (on an
    # H200, AdamW's first round ran 3-4x slower than its second: docs/performance.md 30).
    print(f"\n{'optimizer':18s} {'s/step':>8s} {'ratio':>6s} {'limit':>6s} {'median':>8s} {'ratio':>6s}")
    for name, ts in times.items():
        mean, med = statistics.fmean(ts), statistics.median(ts)
        limit = LIMITS.get(name)
        rows.append(dict(optimizer=name, sec_per_step=mean, median=med, ratio_to_adamw=mean / base,
                         median_ratio_to_adamw=med / base_med, limit=limit, samples=len(ts)))
        flag = "" if limit is None else (" ok" if mean / base <= limit else " OVER")
        print(f"{name:18s} {mean:8.3f} {mean / base:6.2f} {limit if limit else '':>6} {med:8.3f} {med / base_med:6.2f}"
              f"{flag}")
    print(f"load average during the runs: min {min(loads):.2f}, median {statistics.median(loads):.2f}, "
          f"max {max(loads):.2f}")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(dict(rows=rows, loads=loads, n_params=n_params, args=vars(a) | {
            "json": str(a.json), "output_dir": str(a.output_dir)}), indent=2))
    return rows


if __name__ == "__main__":
    main()
