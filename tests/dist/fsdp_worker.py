"""torchrun worker for the FSDP2 tests: sharded Ginger against unsharded Ginger, state size, the one
all-reduce per step, and torch.distributed.checkpoint save / resume / reshard.

    torchrun --nproc_per_node 2 tests/dist/fsdp_worker.py MODE OUT_DIR [CURVATURE]

MODE ``exact``: 20 steps of a tiny T5 under ``fully_shard`` (gloo, CPU), each rank on half of
every global batch, against one process on the whole batches (run on rank 0 in-process);
writes the relative parameter error (and that of the first step's gradients), the per-rank
and unsharded state bytes, the all-reduces counted in each ``optimizer.step()`` and the
collectives of each ``add_sampled_label_curvature`` call. CURVATURE ``empirical`` (default) or
``mc``: sampled labels fixed per (step, half of the global batch), so both sides draw the same.
MODE ``save`` / ``resume``: train 10 steps and save a DCP checkpoint (model and optimizer); load
it (in the same or another world size) and continue to step 20; every rank writes its parameters
(full tensors) after step 20.
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
HP = dict(lr=3e-3, tau=3, curvature="empirical", curvature_interval=1)


def batches(seed=0):
    data = tiny.make_data(STEPS * BATCH, seed=seed)
    return [tiny.collate(data[i * BATCH:(i + 1) * BATCH]) for i in range(STEPS)]


def shard_model(model):
    from torch.distributed.fsdp import fully_shard

    for block in (*model.encoder.block, *model.decoder.block):
        fully_shard(block)
    fully_shard(model)
    return model


def train(model, optimizer, data, steps, rank, world, count=None, parts=1, curvature_calls=None, first_grads=None):
    """Each rank takes its slice of every batch; the loss is the step's mean over ALL its label tokens.

    ``mc``: labels are sampled with a generator per (step, part of the global batch), so a rank
    (``parts=1``: its own part ``rank``) and one process that splits the whole batch into
    ``parts=world`` pieces draw the same labels. ``curvature_calls`` collects the number of
    collectives each ``add_sampled_label_curvature`` call makes; ``first_grads`` gets the first
    step's gradients (full tensors), taken after the curvature pass.
    """
    mc = HP["curvature"] == "mc"
    for step, batch in enumerate(data[:steps]):
        mine = {k: v.chunk(world)[rank] for k, v in batch.items()}
        n_all = batch["labels"].ne(-100).sum()
        out = model(**mine)
        if mc:
            logits, labels = out.logits.chunk(parts), mine["labels"].chunk(parts)
            for part in range(parts):
                gen = torch.Generator().manual_seed(1000 * step + (rank if parts == 1 else part))
                with counting_collectives(curvature_calls):
                    ginger_hf.add_sampled_label_curvature(logits[part], labels[part], optimizer, num_items=n_all,
                                                          generator=gen)
        loss = F.cross_entropy(out.logits.reshape(-1, out.logits.shape[-1]), mine["labels"].reshape(-1),
                               reduction="sum") * (world / n_all)  # FSDP averages gradients over ranks
        loss.backward()
        if first_grads is not None and step == 0:
            first_grads.update(full_params(model, grads=True))
        if count is not None:
            count.append(0)
        optimizer.step()
        optimizer.zero_grad()


class counting_collectives:
    """Count the collectives made inside the block, by kind (appends one ``{kind: calls}`` to ``calls``).

    ``reduce_scatter``: the curvature's sum over ranks; ``all_gather``: FSDP2 all-gathering the
    parameters its pre-backward hooks need for the curvature pass.
    """

    NAMES = {"all_reduce": "all_reduce", "reduce_scatter_tensor": "reduce_scatter",
             "reduce_scatter_single": "reduce_scatter", "all_gather_into_tensor": "all_gather",
             "all_gather_single": "all_gather"}

    def __init__(self, calls):
        self.calls = calls

    def __enter__(self):
        if self.calls is None:
            return self
        self.calls.append({})
        self.saved = {n: getattr(dist, n) for n in self.NAMES if hasattr(dist, n)}

        def wrap(name, fn):
            def counted(*a, **k):
                kind = self.NAMES[name]
                self.calls[-1][kind] = self.calls[-1].get(kind, 0) + 1
                return fn(*a, **k)
            return counted

        for n, fn in self.saved.items():
            setattr(dist, n, wrap(n, fn))
        return self

    def __exit__(self, *exc):
        if self.calls is not None:
            for n, fn in self.saved.items():
                setattr(dist, n, fn)
        return False


def full_params(model, grads=False) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    tensors = {n: p.grad if grads else p for n, p in model.named_parameters()}
    return {n: (t.full_tensor() if isinstance(t, DTensor) else t).detach().clone() for n, t in tensors.items()}


def relative_error(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    num = sum(float((got[k].double() - ref[k].double()).norm() ** 2) for k in ref)
    den = sum(float(ref[k].double().norm() ** 2) for k in ref)
    return (num / den) ** 0.5


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
    if len(sys.argv) > 3:
        HP["curvature"] = sys.argv[3]
    if len(sys.argv) > 4:  # the step's implementation, e.g. "torch": the device-resident step
        HP["backend"] = sys.argv[4]
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
    if world > 1 and HP["curvature"] == "mc":
        assert ginger_hf.sync_curvature(optimizer, model)  # FSDP2: mc needs the model (unsharded parameters)
    result = {"rank": rank, "world": world}

    if mode == "exact":
        counts: list[int] = []
        curvature_calls: list[int] = []
        original = dist.all_reduce
        dist.all_reduce = counting_all_reduce(counts)  # counted inside optimizer.step() only
        try:
            sharded_grads: dict[str, torch.Tensor] = {}
            train(model, optimizer, data, STEPS, rank, world, counts, curvature_calls=curvature_calls,
                  first_grads=sharded_grads)
        finally:
            dist.all_reduce = original
        result["all_reduces_per_step"] = counts
        result["collectives_per_curvature_call"] = curvature_calls
        result["state_bytes"] = state_bytes(optimizer)
        sharded = full_params(model)
        if rank == 0:
            ref_model = tiny.tiny_t5(seed=0, dropout=0.0)
            ref_opt = ginger_hf.Ginger(ref_model.parameters(), **HP)
            ref_grads: dict[str, torch.Tensor] = {}
            train(ref_model, ref_opt, data, STEPS, 0, 1, parts=world, first_grads=ref_grads)
            ref = full_params(ref_model)
            result["relative_error"] = relative_error(sharded, ref)
            result["first_grad_relative_error"] = relative_error(sharded_grads, ref_grads)
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
    tiny.run_worker(main)
