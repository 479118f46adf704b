"""Ginger on FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters sharded on dim 0, state sharded alike.

A ``Shard(0)`` DTensor parameter gives each rank a slice of its rows. Every quantity a block
needs is a sum over its elements (``U U^T``, ``U c``, ``U m'``, ``c.c``, ...), so:

* a block that lies inside one rank (a row of a 2+-D tensor with ``blocks="row"``) is
  stepped locally, exactly as without sharding;
* a block that spans ranks (a whole tensor with ``blocks="tensor"``, and every 1-D tensor)
  has its pass-1 sums formed on each rank's slice and completed by an all-reduce (``comm.exchange``); the small
  solve then runs identically on every rank, and pass 2 writes each rank's slice.

All of a step's sums that need completing, and every tensor's finiteness flags (a tensor
is skipped on every rank or on none), travel in ONE all-reduce of one float64 buffer:
O(tau^2) numbers per spanning block. Sharded Ginger is unsharded Ginger up to summation order.

State lives in DTensors placed like the parameter, so ``torch.distributed.checkpoint``
saves and reshards it: ``m`` like the parameter, ``U`` ``(n, *shape)`` on dim 1, and the
small per-block state (``s``, ``R``, ``e``) on dim 0 for row blocks, replicated for a
spanning block. Each rank holds about ``(tau + 1) d / world`` numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import state_schema
from .state_schema import block_shape

__all__ = ["Sharding", "sharding_of", "localise", "local"]

_REFUSED = (
    "Ginger shards its state like FSDP2 parameters placed Shard(0) on a 1-D device mesh "
    "(torch.distributed.fsdp.fully_shard). Tensor parallel, 2-D meshes (HSDP) and other placements "
    "are not supported; use fully_shard on a 1-D mesh, or DDP."
)


@dataclass(frozen=True)
class Sharding:
    """Where a rank's slice of a ``Shard(0)`` parameter sits, and whether its blocks span ranks."""

    mesh: Any
    group: Any
    shape: torch.Size  # the whole parameter's
    offset: int  # first row of this rank's slice
    spans: bool  # one block across ranks (sums need the all-reduce)
    rows: bool  # row blocks (else one block for the whole parameter)
    block_numel: int  # elements per block of the whole parameter


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except ImportError:  # pragma: no cover - very old torch
        return ()


def is_dtensor(t: Any) -> bool:
    return isinstance(t, _dtensor_type())


def local(t: Tensor | None) -> Tensor | None:
    """The rank's own tensor of a DTensor (a view, no copy); other tensors as they are."""
    return t._local_tensor if is_dtensor(t) else t


def sharding_of(param: Tensor, blocks: str) -> Sharding | None:
    """The ``Sharding`` of an FSDP2 parameter; ``None`` for an ordinary tensor; ``TypeError`` otherwise."""
    if not is_dtensor(param):
        return None
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    mesh, placements = param.device_mesh, param.placements
    if mesh.ndim != 1 or len(placements) != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise TypeError(f"Ginger: got a DTensor of shape {tuple(param.shape)} placed {tuple(placements)} on a "
                        f"{mesh.ndim}-D mesh. {_REFUSED}")
    _, offset = compute_local_shape_and_global_offset(param.shape, mesh, placements)
    _, k = block_shape(param.shape, blocks)
    rows = blocks == "row" and param.dim() >= 2  # blocks are whole rows: each inside one rank
    return Sharding(mesh=mesh, group=mesh.get_group(), shape=param.shape, offset=offset[0] if offset else 0,
                    spans=not rows and mesh.size() > 1, rows=rows, block_numel=k)


def localise(key: Tensor, state: dict[str, Any], grad: Tensor, curvature: Tensor | None):
    """This rank's part of an FSDP2 tensor's step: its parameter, gradient and curvature slices and a view
    of its state (tensors: local views; counters: copied, stored back by ``state_schema.store_counters``)."""
    return local(key), local(grad), local(curvature), state_schema.local_state(state, local)
