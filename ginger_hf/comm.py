"""The optimizer's collectives, all in one place, and its parameter checks (no Ginger imports).

``all_reduce_curvature`` sums DDP ranks' curvature vectors before a step; ``exchange`` completes the
pass-1 sums of FSDP2 blocks that span ranks inside a step (``ginger_hf.sharding``).
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch import Tensor

__all__ = ["world_size", "all_reduce_curvature", "exchange", "sharded_kind", "check_not_sharded", "SUPPORTED"]

SUPPORTED = (
    "Ginger supports one process, distributed data parallel (DDP: torchrun, accelerate launch "
    "with distributed_type MULTI_GPU/MULTI_CPU, the Trainer on several processes), and FSDP2 "
    "(torch.distributed.fsdp.fully_shard, accelerate/Trainer with fsdp_version 2)."
)



def world_size(group) -> int:
    return dist.get_world_size(group) if group is not None else 1


def all_reduce_curvature(vectors: list[Tensor], group) -> list[Tensor]:
    """Sum ``vectors`` over ``group`` with one all-reduce of one flat buffer; returns the summed vectors.

    The buffer is float32 (or wider if a vector is wider), so bf16/fp16 vectors are summed
    without extra rounding. Every rank must pass vectors of the same shapes in the same order.
    """
    if not vectors:
        return []
    import torch

    dtype = torch.float32
    for v in vectors:
        dtype = torch.promote_types(dtype, v.dtype)
    flat = torch.cat([v.reshape(-1).to(dtype) for v in vectors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return [chunk.view_as(v) for chunk, v in zip(flat.split([v.numel() for v in vectors]), vectors)]


def exchange(sums: list[Tensor], flags: Tensor, spans: list[bool], group) -> None:
    """The fast step's one collective after pass 1, in place: ONE all-reduce (on the sums' device, no host
    round trip) of the spanning blocks' sums and every tensor's finiteness flags, so that every rank takes
    the same decisions and solves the same small problems."""
    import torch

    parts = [flags.reshape(-1).to(torch.float64)] + [s.reshape(-1) for s, sp in zip(sums, spans) if sp]
    flat = torch.cat([x.to(flags.device) for x in parts])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    pieces = flat.split([x.numel() for x in parts])
    flags.copy_(pieces[0].view_as(flags))
    spanning = [s for s, sp in zip(sums, spans) if sp]
    if spanning:
        torch._foreach_copy_(spanning, [x.view_as(s) for x, s in zip(pieces[1:], spanning)])


def sharded_kind(param: Any) -> str | None:
    """Name of the unsupported sharding scheme ``param`` belongs to, or ``None``.

    DTensors are not named here: ``ginger_hf.sharding`` supports FSDP2's and refuses the rest.
    """
    if getattr(param, "_fsdp_flattened", False) or getattr(param, "_is_flat_param", False):
        return "FSDP flat parameter"
    if hasattr(param, "ds_id") or hasattr(param, "ds_numel"):
        return "DeepSpeed ZeRO partitioned parameter"
    return None


def check_not_sharded(params) -> None:
    """Raise ``TypeError`` if any parameter is an FSDP1 flat parameter or a DeepSpeed ZeRO partition."""
    for p in params:
        kind = sharded_kind(p)
        if kind is not None:
            raise TypeError(
                f"Ginger: got a {kind} of shape {tuple(p.shape)}. This kind of sharded parameter is not supported: "
                f"each rank would build its curvature model from a slice. {SUPPORTED}"
            )
