"""What a step takes: the tensors with a gradient, their curvature vectors, summed over data-parallel ranks.

``collect`` checks everything before anything changes (a bad gradient or a missing curvature vector
raises with the optimizer untouched); ``sync_curvature`` sums the ``mc`` vectors over the optimizer's
``curvature_group`` (DDP) with one all-reduce. ``Ginger.step`` calls both.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from . import sharding
from .comm import all_reduce_curvature, world_size
from .pending import get_curvature

__all__ = ["collect", "sync_curvature", "curvature_of"]


def curvature_of(p: Tensor, group: dict[str, Any]) -> Tensor | None:
    """The curvature vector a refreshing tensor reads; raises if an ``mc`` tensor has none."""
    if group["curvature"] == "empirical":
        return p.grad
    curv = get_curvature(p)
    if curv is None:
        raise RuntimeError(
            "Ginger(curvature='mc') needs a curvature vector on this refresh step, but parameter "
            f"of shape {tuple(p.shape)} has none. Before optimizer.step(), compute it with "
            "ginger_hf.add_sampled_label_curvature(logits, labels, optimizer) (or set "
            "`param.curvature` yourself), or construct Ginger with curvature='empirical'."
        )
    if sharding.is_dtensor(p) and not sharding.is_dtensor(curv):  # this rank's slice of an FSDP2 parameter
        if curv.shape != sharding.local(p).shape:
            raise ValueError(f"Ginger: param.curvature shape {tuple(curv.shape)} != this rank's slice of the "
                             f"parameter {tuple(sharding.local(p).shape)}")
    elif curv.shape != p.shape:
        raise ValueError(f"Ginger: param.curvature shape {tuple(curv.shape)} != parameter shape {tuple(p.shape)}")
    return curv

def collect(opt) -> list[tuple[dict[str, Any], list[tuple[Tensor, list[Tensor], Tensor, Tensor | None]]]]:
    """Tensors that take a step as ``(state key, params, grad, curvature)``; raises before any change.

    A joint group is one block whose gradient and curvature are the flattened
    concatenations over its params (zeros for a param without gradient). Empty
    parameters take no step: there is nothing to move.
    """
    plan = []
    for group in opt.param_groups:
        with_grad = [p for p in group["params"] if p.grad is not None]
        for p in with_grad:
            if p.grad.is_sparse:
                raise TypeError("Ginger does not support sparse gradients; use a dense embedding (sparse=False)")
            if opt._key(p, group) not in opt.state:
                opt._check_placement((p,), group)  # accelerate's FSDP swaps param_groups after construction
            if p.grad.shape != p.shape:
                raise ValueError(f"Ginger: gradient shape {tuple(p.grad.shape)} != parameter shape {tuple(p.shape)}")
        entries = []
        if group["joint"] and with_grad and any(p.numel() for p in group["params"]):
            params = group["params"]
            grad = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
            curv = None
            if opt._refreshes(params[0], group):
                if group["curvature"] == "empirical":
                    curv = grad
                else:
                    curv = torch.cat([curvature_of(p, group).reshape(-1) for p in params])
            entries.append((params[0], params, grad, curv))
        elif not group["joint"]:
            for p in with_grad:
                if p.numel() == 0:  # nothing to step (Ginger's blocks need at least one element)
                    continue
                curv = curvature_of(p, group) if opt._refreshes(p, group) else None
                entries.append((p, [p], p.grad, curv))
        plan.append((group, entries))
    return plan

def sync_curvature(opt, plan) -> None:
    """Sum the step's ``mc`` curvature vectors over ``curvature_group``: one all-reduce, none if there are none.

    FSDP2 parameters are skipped: their vectors arrive summed already (``ginger_hf.sharded_curvature``).
    """
    slots = [(entries, i) for _, entries in plan for i, (key, _, g, c) in enumerate(entries)
             if c is not None and c is not g and not sharding.is_dtensor(key)]
    if not slots:
        return
    if opt.curvature_group is None:
        dist = torch.distributed
        if not opt._warned_unsynced and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            opt._warned_unsynced = True
            warnings.warn(
                "Ginger(curvature='mc') runs in a multi-process job but sums no curvature across ranks. If the "
                "model is DDP-wrapped, call ginger_hf.sync_curvature(optimizer, model) after wrapping; "
                "independent processes can ignore this.", stacklevel=3,
            )
        return
    if world_size(opt.curvature_group) == 1:
        return
    summed = all_reduce_curvature([entries[i][3] for entries, i in slots], opt.curvature_group)
    for (entries, i), c in zip(slots, summed):
        entries[i] = (*entries[i][:3], c)
