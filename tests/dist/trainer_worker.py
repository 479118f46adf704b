"""Stock Seq2SeqTrainer with ``--optim ginger`` under torchrun (CPU, gloo), for tests/test_ddp_trainer.py.

Writes ``<out>/rank<r>.pt``: parameters + Ginger state, the optimizer's curvature group, and the number
of ``all_reduce`` calls made between the Trainer's ``on_pre_optimizer_step`` and ``on_optimizer_step``.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

import ginger_hf  # noqa: E402


class CountAllReduce(TrainerCallback):
    """Counts ``torch.distributed.all_reduce`` calls inside each ``optimizer.step()``."""

    def __init__(self):
        self.calls, self._real = [], dist.all_reduce

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.calls.append(0)

        def counting(*a, **k):
            self.calls[-1] += 1
            return self._real(*a, **k)

        dist.all_reduce = counting

    def on_optimizer_step(self, args, state, control, **kwargs):
        dist.all_reduce = self._real


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--curvature", default="mc")
    args = ap.parse_args()
    torch.set_num_threads(1)
    targs = Seq2SeqTrainingArguments(
        output_dir=os.path.join(args.out, "run"), optim="ginger", optim_args=f"tau=2,curvature={args.curvature}",
        learning_rate=3e-3, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
        save_strategy="no", use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=0, logging_steps=100,
    )
    counter = CountAllReduce()
    trainer = Seq2SeqTrainer(model=tiny.tiny_t5(seed=0, dropout=0.1), args=targs,
                             train_dataset=tiny.make_data(96, seed=4), callbacks=[counter])
    trainer.train()
    ginger = ginger_hf.unwrap_ginger(trainer.optimizer)
    result = {
        "snapshot": tiny.snapshot(trainer.model, trainer.optimizer),
        "world": targs.world_size,
        "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "synced": ginger.curvature_group is not None,
        "all_reduce_calls": counter.calls,
    }
    os.makedirs(args.out, exist_ok=True)
    torch.save(result, os.path.join(args.out, f"rank{targs.process_index}.pt"))


if __name__ == "__main__":
    main()
    if dist.is_initialized():
        dist.destroy_process_group()  # gloo aborts at exit when a group is left alive
