"""Fast, one-process checks of the data-parallel rules (the 2-process runs are in test_ddp*.py)."""

from __future__ import annotations

import pytest
import torch
from helpers import causal_data, seq2seq_data, tiny_gpt2, tiny_t5
from transformers import Trainer, TrainingArguments

import ginger_hf
from ginger_hf.comm import all_reduce_curvature
from ginger_hf.curvature_hook import attach_curvature_hook
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


# -- torch.nn.DataParallel (several GPUs in one process) is refused everywhere Ginger meets it ---------


def test_sync_curvature_refuses_a_data_parallel_model():
    model = torch.nn.Linear(2, 2)
    wrapped = torch.nn.DataParallel(model)  # on CPU it just holds the module; the type is what counts
    opt = ginger_hf.Ginger(model.parameters())
    with pytest.raises(TypeError, match="DataParallel.*torchrun --nproc_per_node"):
        ginger_hf.sync_curvature(opt, wrapped)
    assert opt.curvature_group is None


def test_curvature_hook_refuses_data_parallel_replicas():
    model = tiny_t5()
    opt = ginger_hf.Ginger(model.parameters())
    attach_curvature_hook(model, opt, accumulation_steps=1)
    rows = seq2seq_data(4)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    replica = model._replicate_for_data_parallel()  # what DataParallel runs, one per GPU, in threads
    with pytest.raises(RuntimeError, match="DataParallel.*torchrun --nproc_per_node"):
        replica(**batch)
    assert all(ginger_hf.get_curvature(p) is None for p in model.parameters())
    model(**batch)  # the model itself still gets its curvature
    assert all(ginger_hf.get_curvature(p) is not None for p in model.parameters())


def test_trainer_refuses_a_process_that_would_use_data_parallel(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), optim="ginger", use_cpu=True, report_to=[])
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data(8))
    args._n_gpu = 2  # what a process that sees two GPUs has; Trainer._wrap_model then uses nn.DataParallel
    with pytest.raises(RuntimeError, match="sees 2 GPUs.*DataParallel.*torchrun --nproc_per_node"):
        trainer.create_optimizer()

