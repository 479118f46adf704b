"""Sharded parameters (FSDP, DTensor, DeepSpeed ZeRO) are refused with a clear error, before any change.

FSDP1 / FSDP2 wrap real modules here on a one-process gloo group (CPU).
"""

from __future__ import annotations


import pytest
import torch
import torch.distributed as dist

import ginger_hf
from ginger_hf.distributed import check_model_supported, check_not_sharded

SUPPORTED = "distributed data parallel"




def _raises_sharded(fn, kind: str):
    with pytest.raises(TypeError) as info:
        fn()
    message = str(info.value)
    assert kind in message and SUPPORTED in message, message


def test_fsdp2_dtensor_parameters_are_refused(one_process_group):
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    fully_shard(model)
    _raises_sharded(lambda: ginger_hf.Ginger(model.parameters()), "DTensor")
    plain = ginger_hf.Ginger(torch.nn.Linear(2, 2).parameters())
    _raises_sharded(lambda: ginger_hf.sync_curvature(plain, model), "FSDPModule")


def test_fsdp1_flat_parameters_are_refused(one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    for use_orig_params in (False, True):
        model = FSDP(torch.nn.Linear(4, 3), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        _raises_sharded(lambda: ginger_hf.Ginger(model.parameters()), "FSDP flat parameter")
        _raises_sharded(lambda: check_model_supported(model), "FullyShardedDataParallel")


def test_params_swapped_in_after_construction_are_refused_before_any_change(one_process_group):
    """accelerate's FSDP path replaces ``param_groups`` entries after the optimizer exists."""
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = torch.nn.Linear(4, 3)
    opt = ginger_hf.Ginger(model.parameters(), curvature="empirical")
    wrapped = FSDP(model, device_id=torch.device("cpu"))
    (flat,) = list(wrapped.parameters())
    opt.param_groups[0]["params"] = [flat]
    flat.grad = torch.ones_like(flat)
    before = flat.detach().clone()
    _raises_sharded(opt.step, "FSDP flat parameter")
    assert torch.equal(flat.detach(), before) and not opt.state


def test_deepspeed_zero_parameters_and_engines_are_refused():
    p = torch.nn.Parameter(torch.zeros(0))
    p.ds_id, p.ds_numel = 0, 12  # how ZeRO-3 marks its partitioned parameters
    _raises_sharded(lambda: check_not_sharded([p]), "DeepSpeed ZeRO")

    class DeepSpeedEngine(torch.nn.Module):  # stand-in with DeepSpeed's class name (deepspeed is not installed)
        pass

    _raises_sharded(lambda: check_model_supported(DeepSpeedEngine()), "DeepSpeedEngine")


def test_ordinary_and_ddp_models_are_accepted(one_process_group):
    model = torch.nn.Linear(4, 3)
    opt = ginger_hf.Ginger(model.parameters(), curvature="mc")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert ginger_hf.sync_curvature(opt, ddp) is False  # a one-process group: nothing to sum
    assert opt.curvature_group is None
    with pytest.raises(TypeError, match="ginger_hf.Ginger"):
        ginger_hf.sync_curvature(torch.optim.SGD(model.parameters(), lr=0.1), ddp)
