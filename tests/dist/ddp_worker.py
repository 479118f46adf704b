"""Plain Accelerate training loop with Ginger, run by tests/test_ddp.py under torchrun (or plain python).

Writes ``<out>/rank<r>.pt``: parameters + Ginger state, the number of ``all_reduce`` calls made
inside each ``optimizer.step()``, whether that step refreshed curvature, and the warnings raised.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import tiny  # noqa: E402

import ginger_hf  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--curvature", default="mc", choices=["mc", "empirical"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="per-process micro-batch size")
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--interval", type=int, default=1)
    ap.add_argument("--damping", type=float, default=1e-2)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--no-ddp", action="store_true", help="independent processes: the model is not DDP-wrapped")
    ap.add_argument("--generator-seed", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)

    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(cpu=True)
    set_seed(0)
    model = tiny.tiny_t5(seed=0, dropout=args.dropout)
    optimizer = ginger_hf.Ginger(
        model.parameters(), lr=1e-2, damping=args.damping, curvature=args.curvature,
        curvature_interval=args.interval,
    )
    data = tiny.make_data(args.batch * accelerator.num_processes * args.steps * args.accum, seed=1)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch, collate_fn=tiny.collate)
    if args.no_ddp:
        optimizer, loader = accelerator.prepare(optimizer, loader)
    else:
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    synced = ginger_hf.sync_curvature(optimizer, model)

    calls, refresh = [], []
    real_all_reduce = dist.all_reduce

    @contextlib.contextmanager
    def count_all_reduce(step):
        count = [0]

        def counting(*a, **k):
            count[0] += 1
            return real_all_reduce(*a, **k)

        refresh.append(ginger_hf.unwrap_ginger(optimizer).needs_curvature())
        dist.all_reduce = counting
        try:
            yield
        finally:
            dist.all_reduce = real_all_reduce
            calls.append(count[0])

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tiny.train_steps(
            accelerator, model, optimizer, iter(loader), args.steps, accum=args.accum, curvature=args.curvature,
            generator_seed=args.generator_seed, on_step=count_all_reduce,
        )
    result = {
        "snapshot": tiny.snapshot(model, optimizer),
        "all_reduce_calls": calls,
        "refresh": refresh,
        "synced": synced,
        "world": accelerator.num_processes,
        "warnings": [str(w.message) for w in caught if "Ginger" in str(w.message)],
    }
    tiny.save_rank_result(result, args.out, accelerator.process_index)
    accelerator.end_training()


if __name__ == "__main__":
    tiny.run_worker(main)
