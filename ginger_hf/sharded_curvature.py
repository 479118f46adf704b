"""Sampled-label (``mc``) curvature for FSDP2 (``fully_shard``) parameters.

Under ``fully_shard`` the optimizer holds ``Shard(0)`` DTensor parameters, but the forward pass
runs on FSDP2's *unsharded* parameters (all-gathered ``nn.Parameter`` leaves, one per sharded
parameter): the sharded ones are not in the autograd graph, and ``torch.autograd.grad`` with
respect to them would give nothing. So the vector is taken with respect to the unsharded
parameters (FSDP2 keeps one ``FSDPParam`` per sharded parameter; its ``unsharded_param`` is the
leaf of the graph), giving on every rank the full-size contribution of its own micro-batch;
ONE reduce-scatter per call sums those over the ranks and leaves each rank its ``Shard(0)`` slice,
which becomes ``param.curvature`` (the rank's slice, the shape ``Ginger.step`` expects).

The sum (not a mean) over ranks is DDP's rule (``ginger_hf.distributed``): with ``num_items``
the label count of the step on all ranks the slice is that of the vector one process computes
on the whole batch.

FSDP2's hooks take the extra ``autograd.grad`` like a backward pass: its pre-backward hooks
all-gather the parameters of each module that was resharded after the forward, its post-backward
hooks find no gradient (``.grad`` is never touched) and reshard. The real backward that follows
then all-gathers again and reduce-scatters the true gradients unchanged. Groups that were still
unsharded (the root) are kept so, and the backward-prefetch order the pass used up is restored.

Cost per call: the full-size gradient of the rank's micro-batch (the model's size, transiently,
like an unsharded ``.grad``), one reduce-scatter of it (what FSDP2 sends for the gradient), and
FSDP2's all-gather of the resharded modules' parameters for the pass (as for the backward).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from . import sharding

__all__ = ["NOT_IN_GRAPH", "fsdp_param_table", "is_fsdp2_model", "fsdp_states", "sharded_mc_grads", "sharded_params",
           "remember_model", "model_of", "mesh_group"]

NOT_IN_GRAPH = (
    "Ginger curvature='mc' got FSDP2 (fully_shard) parameters: these sharded DTensors are not in the autograd graph "
    "(FSDP2 runs the forward pass on unsharded copies), so a gradient taken with respect to them would be zero. "
    "Tell Ginger the model: ginger_hf.sync_curvature(optimizer, model) after fully_shard(model) (then pass the "
    "optimizer to add_sampled_label_curvature), or pass add_sampled_label_curvature(..., model=model); the "
    "Trainer's --optim ginger does this itself. Or use curvature='empirical'."
)


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule

        return FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return ()


def fsdp_states(model: nn.Module) -> list[Any]:
    """The FSDP2 states of ``model`` and its submodules (each once), in module order."""
    kind = _fsdp_module_type()
    states, seen = [], set()
    for module in model.modules():
        if isinstance(module, kind):
            state = module._get_fsdp_state()
            if id(state) not in seen:
                seen.add(id(state))
                states.append(state)
    return states


def is_fsdp2_model(model: Any) -> bool:
    return isinstance(model, nn.Module) and bool(fsdp_states(model))


def _param_groups(state) -> list[Any]:
    groups = getattr(state, "_fsdp_param_groups", None)
    if groups is None:  # torch < 2.10: one group per state
        group = getattr(state, "_fsdp_param_group", None)
        groups = [group] if group is not None else []
    return list(groups)


def fsdp_param_table(model: nn.Module) -> dict[int, Any]:
    """``id(sharded parameter) -> FSDPParam`` for every parameter ``fully_shard`` manages in ``model``."""
    table = {}
    for state in fsdp_states(model):
        for group in _param_groups(state):
            for fsdp_param in group.fsdp_params:
                table[id(fsdp_param.sharded_param)] = fsdp_param
    return table


def sharded_params(params: list[Tensor], model: nn.Module) -> list[Tensor]:
    """``params`` with FSDP2's unsharded copies replaced by their sharded parameters (the optimizer's).

    After the forward, a module that FSDP2 left unsharded (the root) lists its unsharded copies in
    ``model.parameters()``; a curvature vector set on those would never reach the optimizer.
    """
    back = {id(fp._unsharded_param): fp.sharded_param for fp in fsdp_param_table(model).values()
            if hasattr(fp, "_unsharded_param")}
    return [back.get(id(p), p) for p in params]


def _check_not_mid_forward(model: nn.Module) -> None:
    for state in fsdp_states(model):
        if getattr(getattr(state, "_training_state", None), "name", None) == "FORWARD":
            raise RuntimeError(
                "Ginger curvature='mc' with FSDP2: the curvature vector was requested while an FSDP2 module is still "
                "in its forward pass (a forward hook that runs before FSDP2's own). Compute it after the model's "
                "forward returns (or register the hook after fully_shard)."
            )


class _CurvaturePass:
    """Around the curvature ``autograd.grad``: leave FSDP2 as the real backward expects to find it.

    * groups still unsharded after the forward (the root, ``reshard_after_forward=False``) stay
      unsharded: the pass's final callback would reshard them and the real backward all-gather
      them again (for the root: the embeddings);
    * the backward-prefetch bookkeeping that the pass used up is put back.

    Private FSDP2 attributes: on another torch version only these savings are lost.
    """

    def __init__(self, model: nn.Module):
        self.groups = [g for s in fsdp_states(model) for g in _param_groups(s)]

    def __enter__(self):
        try:
            self.indices = [list(g._post_forward_indices) for g in self.groups]
            self.orders = {id(g.comm_ctx): (g.comm_ctx, list(g.comm_ctx.post_forward_order)) for g in self.groups}
        except AttributeError:
            self.indices = None
        self.kept = [(g, g.reshard_after_backward) for g in self.groups
                     if getattr(g, "is_unsharded", False) and hasattr(g, "reshard_after_backward")]
        for g, _ in self.kept:
            g.reshard_after_backward = False
        return self

    def __exit__(self, *exc):
        for g, value in self.kept:
            g.reshard_after_backward = value
        if self.indices is not None and exc[0] is None:
            for g, idx in zip(self.groups, self.indices):
                g._post_forward_indices[:] = idx
            for ctx, order in self.orders.values():
                ctx.post_forward_order[:] = order
        return False


def _reduce_scatter(output: Tensor, input: Tensor, group) -> None:
    fn = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    fn(output, input, op=dist.ReduceOp.SUM, group=group)


def sharded_mc_grads(loss: Tensor, params: list[Tensor], model: nn.Module, *, retain_graph: bool,
                     factor: float) -> list[Tensor | None]:
    """``factor * d loss / d param`` for each of ``params``, summed over ranks for FSDP2 ones (their local slice).

    Plain parameters get this rank's full gradient (``None`` if unused), as ``torch.autograd.grad``
    gives it; FSDP2 parameters get their ``Shard(0)`` slice of the gradient summed over the
    mesh (zeros where unused): one reduce-scatter of one flat buffer for all of them.
    """
    table = fsdp_param_table(model)
    sharded = [i for i, p in enumerate(params) if sharding.is_dtensor(p)]
    missing = [tuple(params[i].shape) for i in sharded if id(params[i]) not in table]
    if missing:
        raise TypeError(f"Ginger curvature='mc': {len(missing)} FSDP2 parameter(s) (shapes {missing[:3]}) are not "
                        f"managed by fully_shard in the given model. {NOT_IN_GRAPH}")
    _check_not_mid_forward(model)
    places = [sharding.sharding_of(params[i], "row") for i in sharded]  # raises for other placements
    groups = {id(pl.group) for pl in places}
    if len(groups) > 1:
        raise TypeError("Ginger curvature='mc': FSDP2 parameters on different device meshes are not supported")

    leaves: list[Tensor] = []
    slot: list[int | None] = []  # index into leaves, or None (no unsharded parameter yet: not in the graph)
    for i, p in enumerate(params):
        if sharding.is_dtensor(p):
            fp = table[id(p)]
            leaf = fp._unsharded_param if hasattr(fp, "_unsharded_param") else None
            if leaf is not None and sharding.is_dtensor(leaf):  # 2-D parallelism (TP inside): refused elsewhere
                raise TypeError(f"Ginger curvature='mc': {sharding._REFUSED}")
            if leaf is None or not leaf.requires_grad:
                slot.append(None)
                continue
        else:
            leaf = p
        slot.append(len(leaves))
        leaves.append(leaf)
    with _CurvaturePass(model):
        grads = torch.autograd.grad(loss, leaves, retain_graph=retain_graph, allow_unused=True) if leaves else ()

    out: list[Tensor | None] = [None] * len(params)
    for i, p in enumerate(params):
        if not sharding.is_dtensor(p):
            g = grads[slot[i]]
            out[i] = g.mul_(factor) if g is not None else None
    if not sharded:
        return out

    # One reduce-scatter: rank r's chunk holds, for every parameter, rows [r*c, (r+1)*c) of its
    # full-size gradient padded to world*c rows (c = ceil(rows / world): FSDP2's and DTensor's Shard(0)).
    pl0 = places[0]
    world, rank = pl0.mesh.size(), dist.get_rank(pl0.group)
    dtype = torch.float32
    for i in sharded:
        dtype = torch.promote_types(dtype, params[i].dtype)
    device = sharding.local(params[sharded[0]]).device
    layout = []  # (param index, chunk rows, row numel)
    for i in sharded:
        shape = params[i].shape
        rows = shape[0] if len(shape) else 1
        layout.append((i, -(-rows // world), shape[1:].numel() if len(shape) else 1))
    per_rank = sum(c * k for _, c, k in layout)
    buf = torch.zeros(world, per_rank, dtype=dtype, device=device)
    col = 0
    for i, c, k in layout:
        g = grads[slot[i]] if slot[i] is not None else None
        if g is not None:
            flat = g.detach().reshape(-1).to(dtype)
            padded = torch.zeros(world * c * k, dtype=dtype, device=device)
            padded[:flat.numel()] = flat
            buf[:, col:col + c * k] = padded.view(world, c * k)
        col += c * k
    buf.mul_(factor)
    mine = torch.empty(per_rank, dtype=dtype, device=device)
    _reduce_scatter(mine, buf.view(-1), pl0.group)
    col = 0
    for (i, c, k), pl in zip(layout, places):
        local = sharding.local(params[i])
        if pl.offset != rank * c and local.numel():  # FSDP2's uneven last shards: same chunking as ours
            raise RuntimeError(f"Ginger: unexpected Shard(0) layout (offset {pl.offset}, expected {rank * c})")
        out[i] = mine[col:col + local.numel()].view(local.shape).to(local.dtype)
        col += c * k
    return out


_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # Ginger -> weakref to its FSDP2 model


def remember_model(optimizer, model: nn.Module) -> None:
    """Record ``model`` as the FSDP2 model of ``optimizer`` (a ``Ginger``), for its ``mc`` curvature."""
    _MODELS[optimizer] = weakref.ref(model)


def model_of(optimizer) -> nn.Module | None:
    ref = _MODELS.get(optimizer)
    return ref() if ref is not None else None


def mesh_group(params) -> Any:
    """The process group of the first FSDP2 parameter in ``params`` that spans several ranks, else ``None``."""
    for p in params:
        if sharding.is_dtensor(p) and p.device_mesh.size() > 1:
            return p.device_mesh.get_group()
    return None
