"""torchrun worker for the FSDP2 tests: sharded Ginger against unsharded Ginger, state size, the one
all-reduce per step, and torch.distributed.checkpoint save / resume / reshard.

    torchrun --nproc_per_node 2 tests/dist/fsdp_worker.py MODE OUT_DIR [CURVATURE]

MODE ``exact``: 20 steps of a tiny T5 under ``fully_shard`` (gloo, CPU), each rank on half of
every global batch, against one process on the whole batches (run on rank 0 in-process);
writes the relative parameter error, the per-rank and unsharded state bytes and the
all-reduces counted in each ``optimizer.step()``. MODE ``save`` / ``resume``: train 10 steps
and save a DCP checkpoint (model and optimizer); load it (in the same or another world size)
and continue to step 20; every rank writes its parameters (full tensors) after step 20.
Run with one process, the same modes use the unsharded model (the 1-rank side of a reshard).
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny  # noqa: E402

import ginger_hf  # noqa: E402

STEPS, SAVE_AT, BATCH = 20, 10, 8
HP = dict(lr=3e-3, tau=3, curvature="empirical")


def batches(seed=0):
    data = tiny.make_data(STEPS * BATCH, seed=seed)
    return [tiny.collate(data[i * BATCH:(i + 1) * BATCH]) for i in range(STEPS)]


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    for block in (*model.encoder.block, *model.decoder.block):
        fully_shard(block)
    fully_shard(model)
    return model


def train(model, optimizer, data, steps, rank, world, count=None):
    """Each rank takes its slice of every batch; the loss is the step's mean over ALL its label tokens."""
    for batch in data[:steps]:
        mine = {k: v.chunk(world)[rank] for k, v in batch.items()}
        n_all = batch["labels"].ne(-100).sum()
        out = model(**mine)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), mine["labels"].reshape(-1),
                               reduction="sum") * (world / n_all)  # FSDP averages gradients over ranks
        loss.backward()
        if count is not None:
            count.append(0)
        optimizer.step()
        optimizer.zero_grad()


def full_params(model) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def state_bytes(optimizer) -> int:
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                v = ginger_hf.sharding.local(v)
                total += v.numel() * v.element_size()
    return total


def counting_all_reduce(counts):
    """``dist.all_reduce`` that adds one to the current step's count (``train`` opens a count per step)."""
    original = dist.all_reduce

    def wrapper(*args, **kwargs):
        if counts:
            counts[-1] += 1
        return original(*args, **kwargs)

    return wrapper


def main():
    mode, out_dir = sys.argv[1], sys.argv[2]
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world > 1:
        dist.init_process_group("gloo")
    data = batches()
    model = tiny.tiny_t5(seed=0, dropout=0.0)
    if world > 1:
        model = shard_model(model)
    optimizer = ginger_hf.Ginger(model.parameters(), **HP)
    result = {"rank": rank, "world": world}

    if mode == "exact":
        counts: list[int] = []
        original = dist.all_reduce
        dist.all_reduce = counting_all_reduce(counts)  # counted inside optimizer.step() only
        try:
            train(model, optimizer, data, STEPS, rank, world, counts)
        finally:
            dist.all_reduce = original
        result["all_reduces_per_step"] = counts
        result["state_bytes"] = state_bytes(optimizer)
        sharded = full_params(model)
        if rank == 0:
            ref_model = tiny.tiny_t5(seed=0, dropout=0.0)
            ref_opt = ginger_hf.Ginger(ref_model.parameters(), **HP)
            train(ref_model, ref_opt, data, STEPS, 0, 1)
            ref = full_params(ref_model)
            num = sum(float((sharded[k].double() - ref[k].double()).norm() ** 2) for k in ref)
            den = sum(float(ref[k].double().norm() ** 2) for k in ref)
            result["relative_error"] = (num / den) ** 0.5
            result["unsharded_state_bytes"] = state_bytes(ref_opt)
            result["moved"] = sum(float((ref[k] - v).abs().sum()) for k, v in full_params(tiny.tiny_t5(seed=0)).items())
    else:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        ckpt = os.path.join(out_dir, "ckpt")
        if mode == "save":
            train(model, optimizer, data, SAVE_AT, rank, world)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=ckpt)
            train(model, optimizer, data[SAVE_AT:], STEPS - SAVE_AT, rank, world)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=ckpt)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            steps = {int(st["step"]) for st in optimizer.state.values()}
            result["resumed_steps"] = sorted(steps)
            train(model, optimizer, data[SAVE_AT:], STEPS - SAVE_AT, rank, world)
        params = full_params(model)
        torch.save(params, os.path.join(out_dir, f"{mode}_world{world}_rank{rank}.pt"))
    with open(os.path.join(out_dir, f"{mode}_world{world}_rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
