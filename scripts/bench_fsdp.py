"""Ginger on FSDP2 against one unsharded process: bytes communicated, optimizer-step time, state per rank.

One torchrun run. Every rank trains a T5 under ``fully_shard`` on its part of each global batch
(``mc`` or ``empirical`` curvature); rank 0 then trains the same model unsharded on the whole
batches in-process (the other ranks wait). Reported:

* bytes Ginger communicates per optimizer step, counted from the buffers handed to
  ``torch.distributed``: the ONE all-reduce inside ``step()`` (spanning blocks' pass-1 sums and
  every tensor's finiteness flags, float64) and, with ``mc``, the reduce-scatter of each
  ``add_sampled_label_curvature`` call (the full-size vector, summed over ranks) plus the
  all-gathers that FSDP2's pre-backward hooks make for that extra pass (parameters that were
  resharded after the forward). FSDP2's own gradient reduce-scatter is shown for scale;
* median ``optimizer.step()`` seconds, sharded (each rank) vs unsharded (rank 0 alone);
* optimizer state bytes per rank vs unsharded.

    torchrun --nproc_per_node 2 scripts/bench_fsdp.py                        # CPU (gloo), d_model 128
    torchrun --nproc_per_node 2 scripts/bench_fsdp.py --curvature empirical --blocks tensor
    torchrun --nproc_per_node 8 scripts/bench_fsdp.py --d-model 512 --layers 6   # GPUs: NCCL, one per rank

Timing lives here, never in the tests. Numbers on a shared machine are noisy: read ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import T5Config, T5ForConditionalGeneration

import ginger_hf
from ginger_hf.sharding import local

COLLECTIVES = {"all_reduce": "all_reduce", "reduce_scatter_tensor": "reduce_scatter",
               "reduce_scatter_single": "reduce_scatter", "all_gather_into_tensor": "all_gather",
               "all_gather_single": "all_gather"}


def _buffer(kind: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """A collective's full-size buffer: all_reduce's tensor, the reduce-scatter's input, the all-gather's output."""
    if kind == "all_reduce":
        return args[0] if args else kwargs["tensor"]
    if kind == "reduce_scatter":
        return args[1] if len(args) > 1 else kwargs["input"]
    return args[0] if args else kwargs.get("output_tensor", kwargs.get("output"))


class Traffic:
    """Bytes and calls of ``torch.distributed`` collectives, per phase of the step (``phase`` is set by the loop)."""

    def __init__(self):
        self.phase = None
        self.bytes = defaultdict(int)
        self.calls = defaultdict(int)
        self._saved = {}

    def install(self):
        for name, kind in COLLECTIVES.items():
            fn = getattr(dist, name, None)
            if fn is None:
                continue
            self._saved[name] = fn

            def counted(*args, _fn=fn, _kind=kind, **kwargs):
                if self.phase is not None:
                    t = _buffer(_kind, args, kwargs)
                    self.bytes[(self.phase, _kind)] += t.numel() * t.element_size()
                    self.calls[(self.phase, _kind)] += 1
                return _fn(*args, **kwargs)

            setattr(dist, name, counted)

    def uninstall(self):
        for name, fn in self._saved.items():
            setattr(dist, name, fn)


def build_model(args, device) -> T5ForConditionalGeneration:
    config = T5Config(vocab_size=args.vocab, d_model=args.d_model, d_kv=args.d_model // 8, d_ff=4 * args.d_model,
                      num_layers=args.layers, num_decoder_layers=args.layers, num_heads=8, dropout_rate=0.0,
                      decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    torch.manual_seed(0)
    return T5ForConditionalGeneration(config).to(device)


def make_batches(args, device) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(args.steps):
        src = torch.randint(2, args.vocab, (args.batch, args.src_len), generator=g)
        out.append({"input_ids": src.to(device), "attention_mask": torch.ones_like(src).to(device),
                    "labels": src[:, :args.tgt_len].clone().to(device)})
    return out


def state_bytes(optimizer) -> int:
    return sum(local(v).numel() * local(v).element_size() for st in optimizer.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train(model, optimizer, batches, rank, world, device, traffic: Traffic | None, curvature: str) -> list[float]:
    """Each rank its slice of every batch; returns the seconds of each ``optimizer.step()``."""
    times = []
    for step, batch in enumerate(batches):
        mine = {k: v.chunk(world)[rank] for k, v in batch.items()}
        n_all = batch["labels"].ne(-100).sum()
        if traffic:
            traffic.phase = "forward"
        out = model(**mine)
        if curvature == "mc":
            if traffic:
                traffic.phase = "curvature"
            gen = torch.Generator(device=device).manual_seed(1000 * step + rank)
            ginger_hf.add_sampled_label_curvature(out.logits, mine["labels"], optimizer, num_items=n_all, generator=gen)
        if traffic:
            traffic.phase = "backward"
        loss = F.cross_entropy(out.logits.flatten(0, 1).float(), mine["labels"].flatten(), reduction="sum")
        (loss * (world / n_all)).backward()
        if traffic:
            traffic.phase = None
        if world > 1:
            dist.barrier()
        sync(device)
        if traffic:
            traffic.phase = "step"
        t = time.perf_counter()
        optimizer.step()
        sync(device)
        times.append(time.perf_counter() - t)
        if traffic:
            traffic.phase = None
        optimizer.zero_grad()
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2, help="encoder and decoder blocks each")
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="global batch (split over ranks)")
    ap.add_argument("--src-len", type=int, default=32)
    ap.add_argument("--tgt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2, help="steps left out of the median")
    ap.add_argument("--curvature", default="mc", choices=["mc", "empirical"])
    ap.add_argument("--blocks", default="row", choices=["row", "tensor"])
    ap.add_argument("--tau", type=int, default=4)
    ap.add_argument("--json", default=None, help="also write the numbers here (rank 0)")
    args = ap.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
        torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group(backend)
    hp = dict(lr=1e-3, tau=args.tau, blocks=args.blocks, curvature=args.curvature)
    batches = make_batches(args, device)

    from torch.distributed.fsdp import fully_shard

    model = build_model(args, device)
    params = sum(p.numel() for p in model.parameters())
    for block in (*model.encoder.block, *model.decoder.block):
        fully_shard(block)
    fully_shard(model)
    optimizer = ginger_hf.Ginger(model.parameters(), **hp)
    ginger_hf.sync_curvature(optimizer, model)
    traffic = Traffic()
    traffic.install()
    try:
        sharded_times = train(model, optimizer, batches, rank, world, device, traffic, args.curvature)
    finally:
        traffic.uninstall()
    sharded_state = state_bytes(optimizer)
    del model, optimizer

    result = None
    if rank == 0:
        ref = build_model(args, device)
        ref_opt = ginger_hf.Ginger(ref.parameters(), **hp)
        ref_times = train(ref, ref_opt, batches, 0, 1, device, None, args.curvature)
        steps = len(batches)
        per_step = {f"{phase}/{kind}": b / steps for (phase, kind), b in traffic.bytes.items()}
        calls = {f"{phase}/{kind}": c / steps for (phase, kind), c in traffic.calls.items()}
        ginger_bytes = sum(v for k, v in per_step.items() if k in ("step/all_reduce", "curvature/reduce_scatter"))
        median = lambda xs: statistics.median(xs[args.warmup:] or xs)  # noqa: E731
        result = {
            "world": world, "device": str(device), "parameters": params, "param_bytes": 4 * params,
            "config": {**vars(args), **{k: v for k, v in hp.items() if k != "lr"}},
            "bytes_per_step": per_step, "calls_per_step": calls,
            "ginger_bytes_per_step": ginger_bytes,
            "curvature_pass_all_gather_bytes": per_step.get("curvature/all_gather", 0),
            "state_bytes_per_rank": sharded_state, "state_bytes_unsharded": state_bytes(ref_opt),
            "step_seconds_sharded": median(sharded_times), "step_seconds_unsharded": median(ref_times),
        }
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    if result is None:
        return
    r = result
    print(f"T5 d_model={args.d_model} layers={args.layers}+{args.layers}: {r['parameters']:,} parameters "
          f"({r['param_bytes'] / 2**20:.2f} MiB fp32), {world} ranks on {device}, curvature={args.curvature}, "
          f"blocks={args.blocks}, tau={args.tau}")
    print("\nbytes communicated per optimizer step (rank 0's buffers; calls per step):")
    for key in sorted(r["bytes_per_step"]):
        who = "FSDP2 itself" if key.startswith(("forward/", "backward/")) else \
            "FSDP2, for Ginger's curvature pass" if key == "curvature/all_gather" else "Ginger"
        print(f"  {key:28s} {r['bytes_per_step'][key] / 1024:10.1f} KiB  x{r['calls_per_step'][key]:.0f}  ({who})")
    print(f"  Ginger's own per step:     {r['ginger_bytes_per_step'] / 1024:10.1f} KiB "
          f"= {r['ginger_bytes_per_step'] / r['param_bytes']:.3f} x the fp32 parameters")
    if r["curvature_pass_all_gather_bytes"]:
        print(f"  + FSDP2's all-gathers for the curvature pass: "
              f"{r['curvature_pass_all_gather_bytes'] / r['param_bytes']:.3f} x the fp32 parameters")
    print("\noptimizer state bytes:")
    print(f"  per rank (sharded)  {r['state_bytes_per_rank'] / 2**20:8.3f} MiB")
    print(f"  unsharded           {r['state_bytes_unsharded'] / 2**20:8.3f} MiB   "
          f"ratio {r['state_bytes_per_rank'] / r['state_bytes_unsharded']:.3f} (1/world = {1 / world:.3f})")
    print("\noptimizer.step() seconds (median):")
    print(f"  sharded, rank 0     {r['step_seconds_sharded'] * 1e3:8.2f} ms")
    print(f"  unsharded           {r['step_seconds_unsharded'] * 1e3:8.2f} ms   "
          f"ratio {r['step_seconds_sharded'] / r['step_seconds_unsharded']:.3f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1, default=str)


if __name__ == "__main__":
    main()
