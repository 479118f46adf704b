"""Fast, one-process checks of the data-parallel rules (the 2-process runs are in test_ddp*.py)."""

from __future__ import annotations

import pytest
import torch

import ginger_hf
from ginger_hf.comm import all_reduce_curvature
from ginger_hf.distributed import check_accelerate_supported, trainer_curvature_group


def test_helper_requires_the_global_label_count_when_curvature_is_summed_over_ranks():
    model = torch.nn.Linear(3, 5)
    opt = ginger_hf.Ginger(model.parameters(), curvature="mc")
    opt.curvature_group = object()  # what sync_curvature sets for a DDP model on several ranks
    logits, labels = model(torch.randn(4, 3)), torch.tensor([0, 1, -100, 4])
    with pytest.raises(ValueError, match="num_items"):
        ginger_hf.add_sampled_label_curvature(logits, labels, opt)
    assert all(ginger_hf.get_curvature(p) is None for p in model.parameters())  # nothing changed
    assert ginger_hf.add_sampled_label_curvature(logits, labels, opt, num_items=6)




def test_all_reduce_curvature_uses_one_float32_buffer_and_keeps_shapes(one_process_group, monkeypatch):
    import torch.distributed as dist

    seen = []
    real = dist.all_reduce
    monkeypatch.setattr(dist, "all_reduce", lambda t, **k: seen.append((t.dtype, t.numel())) or real(t, **k))
    vectors = [torch.randn(2, 3, dtype=torch.bfloat16), torch.randn(4)]
    out = all_reduce_curvature(vectors, one_process_group)
    assert seen == [(torch.float32, 10)]
    for v, o in zip(vectors, out):
        assert o.shape == v.shape and o.dtype == torch.float32 and torch.equal(o, v.float())


@pytest.mark.parametrize("kind", ["DEEPSPEED", "FSDP", "MEGATRON_LM"])
def test_accelerate_configured_for_sharding_is_refused(monkeypatch, kind):
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType

    # accelerate only enters these modes on GPUs; set the state it would record.
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType(kind))
    model = torch.nn.Linear(2, 2)
    opt = ginger_hf.Ginger(model.parameters())
    for call in (check_accelerate_supported, trainer_curvature_group, lambda: ginger_hf.sync_curvature(opt, model)):
        with pytest.raises(TypeError, match=f"{kind}.*distributed data parallel"):
            call()
    assert opt.curvature_group is None


def test_one_process_needs_no_group():
    model = torch.nn.Linear(2, 2)
    assert trainer_curvature_group() is None
    assert ginger_hf.sync_curvature(ginger_hf.Ginger(model.parameters()), model) is False
