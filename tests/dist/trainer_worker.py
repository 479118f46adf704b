"""Stock Seq2SeqTrainer with ``--optim ginger`` under torchrun (CPU, gloo), for tests/test_ddp_trainer.py.

Writes ``<out>/rank<r>.pt``: parameters + Ginger state, the optimizer's curvature group, the number
of ``all_reduce`` calls made between the Trainer's ``on_pre_optimizer_step`` and ``on_optimizer_step``,
and the logged ``ginger/curvature_norm`` of every step. With ``--capture`` also this rank's curvature
vectors before each step (before the sum over ranks), its training micro-batches and the labels
sampled for them.
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
import ginger_hf.curvature  # noqa: E402


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


class Capture(TrainerCallback):
    """This rank's curvature vectors as ``optimizer.step()`` receives them, the micro-batches and sampled labels."""

    def __init__(self, model):
        self.curvature, self.batches, self.sampled = [], [], []
        model.register_forward_pre_hook(self._batch, with_kwargs=True)
        real = ginger_hf.curvature.sample_labels

        def spy(*a, **k):
            out = real(*a, **k)
            self.sampled.append(out.clone())
            return out

        ginger_hf.curvature.sample_labels = spy

    def _batch(self, module, args, kwargs):
        if module.training:
            self.batches.append({k: kwargs[k].clone() for k in ("input_ids", "attention_mask", "labels")})

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        curvature = {n: ginger_hf.get_curvature(p) for n, p in model.named_parameters()}
        self.curvature.append({n: c.clone() for n, c in curvature.items() if c is not None})


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--curvature", default="mc")
    ap.add_argument("--optim-args", default="", help="more optim_args, e.g. log_stats=true")
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--no-average-tokens", action="store_true", help="average_tokens_across_devices=False")
    ap.add_argument("--capture", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    targs = Seq2SeqTrainingArguments(
        output_dir=os.path.join(args.out, "run"), optim="ginger",
        optim_args=",".join(filter(None, [f"tau=2,curvature={args.curvature},curvature_interval=1", args.optim_args])),
        learning_rate=3e-3, per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=6,
        save_strategy="no", use_cpu=True, ddp_backend="gloo", report_to=[], disable_tqdm=True,
        dataloader_num_workers=0, seed=0, logging_steps=1, average_tokens_across_devices=not args.no_average_tokens,
    )
    counter = CountAllReduce()
    model = tiny.tiny_t5(seed=0, dropout=args.dropout)
    callbacks = [counter] + ([Capture(model)] if args.capture else [])
    trainer = Seq2SeqTrainer(model=model, args=targs, train_dataset=tiny.make_data(96, seed=4), callbacks=callbacks)
    trainer.train()
    ginger = ginger_hf.unwrap_ginger(trainer.optimizer)
    result = {
        "snapshot": tiny.snapshot(trainer.model, trainer.optimizer),
        "world": targs.world_size,
        "ddp": isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
        "synced": ginger.curvature_group is not None,
        "all_reduce_calls": counter.calls,
        "logged_norm": [h["ginger/curvature_norm"] for h in trainer.state.log_history if "ginger/curvature_norm" in h],
    }
    if args.capture:
        capture = callbacks[-1]
        result.update(curvature=capture.curvature, batches=capture.batches, sampled=capture.sampled)
    tiny.save_rank_result(result, args.out, targs.process_index)


if __name__ == "__main__":
    tiny.run_worker(main)
