"""Data-parallel curvature for Ginger, and refusal of sharded parameters.

Rule: Ginger never communicates unless told to. In plain loops
``sync_curvature(optimizer, model)`` tells it to when ``model`` is wrapped in
``DistributedDataParallel`` (what ``accelerator.prepare`` does on several processes);
the Trainer integration uses ``trainer_curvature_group()`` (the Trainer DDP-wraps
whenever accelerate runs several processes). Independent processes that merely
share a process group keep their own curvature.

When told, every step that refreshes ``mc`` curvature sums the pending
``param.curvature`` vectors over the model's process group with ONE all-reduce of
one flattened buffer; steps between refreshes and ``curvature="empirical"`` (whose
vector is the gradient, already reduced by DDP) communicate nothing.

Why a sum and not a mean: a curvature vector is ``sum_i grad CE(y~_i) / sqrt(N)``
over the N label positions of the optimizer step. Micro-batches add their share
(like ``.grad`` under accumulation); ranks add theirs the same way, so with
``num_items`` = the step's label count on ALL ranks the result is exactly the vector
one process would compute on the whole batch, just as DDP's averaged gradient of
per-rank mean losses is the whole-batch gradient. (A mean of independent
zero-mean vectors would shrink ``c c^T`` by the world size.)

The same sum needs ``num_items`` = the label count on all ranks; ``global_label_count``
sums a per-rank count when that is all a caller has (the Trainer with
``average_tokens_across_devices=False``).

FSDP2 (``fully_shard``) is supported: ``ginger_hf.sharding`` steps each rank's slice and
``ginger_hf.sharded_curvature`` sums ``mc`` vectors with a reduce-scatter. Other sharded
parameters (FSDP1 flat parameters, other DTensor placements, DeepSpeed ZeRO partitions)
are refused: each rank would see a slice of a tensor and compute a wrong curvature model,
so ``check_not_sharded`` raises instead. ``torch.nn.DataParallel`` is
refused too (``DATA_PARALLEL`` says why).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from . import sharded_curvature, sharding
from .comm import SUPPORTED, check_not_sharded, world_size
from .optimizer import unwrap_ginger

__all__ = [
    "DATA_PARALLEL",
    "global_label_count",
    "sync_curvature",
    "trainer_curvature_group",
    "check_not_sharded",
    "check_model_supported",
    "check_accelerate_supported",
    "world_size",
]


DATA_PARALLEL = (
    "torch.nn.DataParallel (several GPUs in one process, what the Trainer does when a process sees several GPUs) "
    "is not supported: its replicas run the forward pass in parallel threads, so each would add a sampled-label "
    "curvature vector to the same tensors at once, with a label count the Trainer only approximates. Use "
    "distributed data parallel instead, one process per GPU: torchrun --nproc_per_node N (or accelerate "
    "launch) with the same script, or limit the process to one GPU (CUDA_VISIBLE_DEVICES)."
)


def check_model_supported(model: Any) -> None:
    """Raise ``TypeError`` for DataParallel-, FSDP- or DeepSpeed-wrapped models, and for sharded parameters."""
    if isinstance(model, torch.nn.DataParallel):
        raise TypeError(f"Ginger: {DATA_PARALLEL}")
    names = {cls.__name__ for cls in type(model).__mro__}
    wrapper = names & {"FullyShardedDataParallel", "DeepSpeedEngine", "PipelineEngine"}  # FSDP2 (FSDPModule) is fine
    if wrapper:
        raise TypeError(f"Ginger: the model is wrapped in {sorted(wrapper)[0]}, which shards parameters. {SUPPORTED}")
    if isinstance(model, torch.nn.Module):
        params = list(model.parameters())
        check_not_sharded(params)
        for p in params:
            if sharding.is_dtensor(p):
                sharding.sharding_of(p, "row")  # Shard(0) on a 1-D mesh, else TypeError


def _accelerate_state() -> tuple[str | None, int]:
    """accelerate's distributed type (``"MULTI_GPU"``, ``"FSDP"``, ...) and process count, if it is set up."""
    try:
        from accelerate.state import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None, 1
    shared = PartialState._shared_state  # read without creating a state
    kind = shared.get("distributed_type")
    return (None if kind is None else str(getattr(kind, "value", kind))), int(shared.get("num_processes", 1) or 1)


def check_accelerate_supported() -> None:
    """Raise ``TypeError`` if accelerate is set up for FSDP1, DeepSpeed or Megatron-LM (FSDP2 is supported).

    DeepSpeed ZeRO-1/2 hands the optimizer flat partitions that carry no mark, so the
    accelerate configuration is the only place to see it.
    """
    kind, _ = _accelerate_state()
    if kind == "FSDP" and _fsdp_version() == 2:
        return
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        what = "FSDP1" if kind == "FSDP" else kind
        raise TypeError(f"Ginger: accelerate is configured for {what}, which shards parameters. {SUPPORTED}")


def _fsdp_version() -> int | None:
    try:
        from accelerate.state import AcceleratorState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return None
    plugin = AcceleratorState._shared_state.get("fsdp_plugin")
    return getattr(plugin, "fsdp_version", None)


def trainer_curvature_group():
    """The group to sum curvature over inside the Trainer, or ``None`` for one process.

    The Trainer DDP-wraps its model whenever accelerate runs several processes without
    FSDP / DeepSpeed (refused here), so that is the rule. Under FSDP2 the sum is the
    reduce-scatter of ``ginger_hf.sharded_curvature`` instead (``None`` here: the optimizer
    must not all-reduce its per-rank slices). Call after the Trainer's ``Accelerator``
    exists (``create_optimizer`` runs after it).
    """
    check_accelerate_supported()
    kind, processes = _accelerate_state()
    if kind == "FSDP":
        return None
    if processes > 1 and kind not in (None, "NO", "XLA") and dist.is_available() and dist.is_initialized():
        return dist.group.WORLD
    return None


def global_label_count(count: int | torch.Tensor, group) -> int:
    """This rank's label count summed over ``group`` (one scalar all-reduce on every rank)."""
    device = count.device if isinstance(count, torch.Tensor) else "cpu"
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    total = torch.as_tensor(count, dtype=torch.float64, device=device).reshape(1).clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
    return int(round(total.item()))


def sync_curvature(optimizer, model) -> bool:
    """Make the Ginger in ``optimizer`` sum ``mc`` curvature over ``model``'s data-parallel group.

    Call once after wrapping, e.g. after ``accelerator.prepare(model, optimizer, ...)``.
    Returns whether curvature will be synchronised (``model`` is DDP-wrapped, or sharded by
    FSDP2 over several ranks). Raises ``TypeError`` for DataParallel / FSDP1 / DeepSpeed models
    or when ``optimizer`` holds no Ginger.

    FSDP2 (``fully_shard``): the optimizer's parameters are sharded DTensors outside the
    autograd graph, so ``add_sampled_label_curvature`` needs the model to reach FSDP2's
    unsharded parameters; this records it. The sum over ranks is then a reduce-scatter in
    ``add_sampled_label_curvature`` (``ginger_hf.sharded_curvature``), not an all-reduce in
    ``step()``: ``curvature_group`` stays ``None``.
    """
    ginger = unwrap_ginger(optimizer)
    if ginger is None:
        raise TypeError(f"sync_curvature: optimizer must be (a wrapper of) ginger_hf.Ginger, got {type(optimizer).__name__}")
    check_model_supported(model)
    check_accelerate_supported()
    if sharded_curvature.is_fsdp2_model(model):
        sharded_curvature.remember_model(ginger, model)
        ginger.curvature_group = None
        return sharded_curvature.mesh_group(model.parameters()) is not None
    group = None
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and dist.get_world_size(model.process_group) > 1:
        group = model.process_group
    ginger.curvature_group = group
    return group is not None
