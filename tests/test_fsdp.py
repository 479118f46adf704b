"""Ginger on FSDP2: sharded Ginger equals unsharded Ginger, its state is split, one all-reduce per step,
and DCP checkpoints resume exactly and reshard between world sizes. Other sharding is refused clearly.

The multi-process tests run ``tests/dist/fsdp_worker.py`` under torchrun with gloo on CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import free_port, reference_curvature, relative_error, seq2seq_data, tiny_t5

import ginger_hf
from ginger_hf.comm import check_not_sharded
from ginger_hf.distributed import check_model_supported

WORKER = Path(__file__).parent / "dist" / "fsdp_worker.py"


def launch(mode: str, out: Path, world: int, *extra: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if world == 1:
        cmd = [sys.executable, str(WORKER), mode, str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world), "--master_port",
               str(free_port()), str(WORKER), mode, str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]


def results(out: Path, mode: str, world: int) -> list[dict]:
    return [json.loads((out / f"{mode}_world{world}_rank{r}.json").read_text()) for r in range(world)]


@pytest.mark.slow
def test_two_ranks_match_one_process_split_the_state_and_reduce_once(tmp_path):
    """20 steps of a tiny T5 (row blocks, and 1-D layer norms that span both ranks), empirical curvature."""
    launch("exact", tmp_path, 2)
    rank0, rank1 = results(tmp_path, "exact", 2)
    assert rank0["relative_error"] <= 1e-5 and rank0["moved"] > 1.0  # it trained, and as unsharded Ginger did
    for r in (rank0, rank1):
        assert r["all_reduces_per_step"] == [1] * 20
        assert r["state_bytes"] <= 0.6 * rank0["unsharded_state_bytes"]


@pytest.mark.slow
def test_device_path_two_ranks_match_one_process_and_reduce_once(tmp_path):
    """The device-resident step (backend="torch") sharded: its one collective completes the spanning blocks' sums
    and the flags on the device (``comm.exchange``), and two ranks step as one unsharded process."""
    launch("exact", tmp_path, 2, "empirical", "torch")
    rank0, rank1 = results(tmp_path, "exact", 2)
    assert rank0["relative_error"] <= 1e-5 and rank0["moved"] > 1.0
    for r in (rank0, rank1):
        assert r["all_reduces_per_step"] == [1] * 20


@pytest.mark.slow
def test_mc_curvature_two_ranks_match_one_process(tmp_path):
    """mc: each rank's vector of its half, taken w.r.t. FSDP2's unsharded parameters and reduce-scattered, is the
    whole batch's; labels are drawn per (step, half) alike on both sides. The gradients survive the extra pass."""
    launch("exact", tmp_path, 2, "mc")
    rank0, rank1 = results(tmp_path, "exact", 2)
    assert rank0["relative_error"] <= 1e-5 and rank0["moved"] > 1.0
    assert rank0["first_grad_relative_error"] <= 1e-6  # FSDP2's gradient after the curvature pass is unchanged
    for r in (rank0, rank1):
        assert r["all_reduces_per_step"] == [1] * 20
        # one reduce-scatter per call (the sum over ranks); FSDP2 all-gathers its 2 resharded blocks for the pass
        assert r["collectives_per_curvature_call"] == [{"reduce_scatter": 1, "all_gather": 2}] * 20


@pytest.mark.slow
def test_dcp_checkpoint_resumes_exactly_and_reshards_between_world_sizes(tmp_path):
    two, one = tmp_path / "from2", tmp_path / "from1"
    two.mkdir(), one.mkdir()
    launch("save", two, 2)  # 2 ranks: 20 steps, a DCP checkpoint after step 10
    launch("resume", two, 2)  # 2 ranks load step 10 and redo steps 11-20
    launch("resume", two, 1)  # 1 process (no FSDP) loads the 2-rank checkpoint
    launch("save", one, 1)  # and the reverse: 1 process saves, 2 ranks load
    launch("resume", one, 2)
    straight = torch.load(two / "save_world2_rank0.pt")
    for path in (two / "resume_world2_rank0.pt", two / "resume_world1_rank0.pt", one / "resume_world2_rank1.pt"):
        resumed = torch.load(path)
        assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) <= 1e-6, path
    single = torch.load(one / "save_world1_rank0.pt")
    assert max((straight[k] - single[k]).abs().max().item() for k in straight) <= 1e-5
    for r in results(two, "resume", 2) + results(two, "resume", 1) + results(one, "resume", 2):
        assert r["resumed_steps"] == [10]


def _raises(fn, *words: str):
    with pytest.raises(TypeError) as info:
        fn()
    for word in words:
        assert word in str(info.value), str(info.value)


def test_other_placements_and_meshes_are_refused(one_process_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    for placement in (Shard(1), Replicate()):
        p = torch.nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [placement]))
        _raises(lambda: ginger_hf.Ginger([p]), "placed", "Shard(0)", "1-D device mesh")


def test_fsdp2_models_are_accepted_and_fsdp1_refused(one_process_group):
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from torch.distributed.fsdp import fully_shard

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    fully_shard(model)
    check_model_supported(model)
    opt = ginger_hf.Ginger(model.parameters(), curvature="empirical")
    model(torch.randn(5, 4)).square().sum().backward()
    opt.step()
    assert all(ginger_hf.sharding.is_dtensor(opt.state[p]["U"]) for p in model.parameters())
    for use_orig_params in (False, True):
        wrapped = FSDP(torch.nn.Linear(4, 3), device_id=torch.device("cpu"), use_orig_params=use_orig_params)
        _raises(lambda: ginger_hf.Ginger(wrapped.parameters()), "FSDP flat parameter")
        _raises(lambda: check_model_supported(wrapped), "FullyShardedDataParallel")


def test_deepspeed_zero_parameters_and_engines_are_refused():
    p = torch.nn.Parameter(torch.zeros(0))
    p.ds_id, p.ds_numel = 0, 12  # how ZeRO-3 marks its partitioned parameters
    _raises(lambda: check_not_sharded([p]), "DeepSpeed ZeRO")

    class DeepSpeedEngine(torch.nn.Module):  # stand-in with DeepSpeed's class name (deepspeed is not installed)
        pass

    _raises(lambda: check_model_supported(DeepSpeedEngine()), "DeepSpeedEngine")


def test_ordinary_and_ddp_models_are_accepted(one_process_group):
    model = torch.nn.Linear(4, 3)
    opt = ginger_hf.Ginger(model.parameters(), curvature="mc")
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    assert ginger_hf.sync_curvature(opt, ddp) is False  # a one-process group: nothing to sum
    assert opt.curvature_group is None
    with pytest.raises(TypeError, match="ginger_hf.Ginger"):
        ginger_hf.sync_curvature(torch.optim.SGD(model.parameters(), lr=0.1), ddp)


def test_dcp_style_initialisation_creates_state_without_stepping():
    """set_optimizer_state_dict steps once with zero gradients and lr 0 to create the state it then overwrites."""
    from torch.distributed.checkpoint.state_dict import _init_optim_state

    model = torch.nn.Linear(4, 3)
    before = [p.detach().clone() for p in model.parameters()]
    opt = ginger_hf.Ginger(model.parameters())  # mc curvature: a real step without a vector would raise
    _init_optim_state(opt)
    assert all(opt.state[p]["step"] == 0 for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def _fsdp_t5(seed=0):
    from torch.distributed.fsdp import fully_shard

    model = tiny_t5(seed)
    for block in (*model.encoder.block, *model.decoder.block):
        fully_shard(block)
    fully_shard(model)
    return model


def _batch():
    rows = seq2seq_data(4)
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def test_mc_on_fsdp2_parameters_without_the_model_is_refused_not_zero(one_process_group):
    """The sharded DTensors are not in the autograd graph: without the model the vector would silently be zero."""
    model, batch = _fsdp_t5(), _batch()
    opt = ginger_hf.Ginger(model.parameters(), curvature="mc")
    logits = model(**batch).logits
    for params in (opt, list(model.parameters())):
        with pytest.raises(TypeError) as info:
            ginger_hf.add_sampled_label_curvature(logits, batch["labels"], params)
        for words in ("not in the autograd graph", "sync_curvature", "curvature='empirical'"):
            assert words in str(info.value)
    assert all(ginger_hf.get_curvature(p) is None for p in model.parameters())


def test_mc_on_fsdp2_is_the_unsharded_vector_and_leaves_gradients_unchanged(one_process_group):
    """One rank: the vector taken w.r.t. FSDP2's unsharded parameters equals the plain model's, and the real
    backward after the extra autograd.grad gives the plain model's gradients (FSDP2's hooks ran twice)."""
    model, plain, batch = _fsdp_t5(), tiny_t5(0), _batch()
    opt = ginger_hf.Ginger(model.parameters(), curvature="mc")
    assert ginger_hf.sync_curvature(opt, model) is False  # one rank: nothing to sum, but the model is recorded
    out = model(**batch)
    assert ginger_hf.add_sampled_label_curvature(out.logits, batch["labels"], opt,
                                                 generator=torch.Generator().manual_seed(3))
    out.loss.backward()
    plain_out = plain(**batch)
    sampled = ginger_hf.sample_labels(plain_out.logits, batch["labels"], generator=torch.Generator().manual_seed(3))
    expected = reference_curvature(plain, [batch], [sampled])
    plain_out.loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        curv = ginger_hf.get_curvature(p)
        assert not ginger_hf.sharding.is_dtensor(curv) and curv.shape == ginger_hf.sharding.local(p).shape
        assert relative_error(curv, expected[name]) <= 1e-5, name
        assert relative_error(ginger_hf.sharding.local(p.grad), q.grad) <= 1e-6, name
    assert sum(float(c.norm()) for c in expected.values()) > 0
    opt.step()  # consumes the slices
    assert all(ginger_hf.get_curvature(p) is None for p in model.parameters())

    # After a forward, model.parameters() lists the root's unsharded copies; their vectors go to the sharded ones.
    out = model(**batch)
    assert not all(ginger_hf.sharding.is_dtensor(p) for p in model.parameters())
    ginger_hf.add_sampled_label_curvature(out.logits, batch["labels"], list(model.parameters()), model=model)
    assert all(ginger_hf.get_curvature(p) is not None for p in opt.param_groups[0]["params"])


def test_accelerate_fsdp2_recipe_config_gives_a_plugin_ginger_accepts(monkeypatch):
    """recipes/accelerate/fsdp2_multi_gpu_bf16.yaml, through `accelerate launch`'s own environment, is FSDP2 with
    full sharding and sharded checkpoints; Ginger accepts that accelerate state and sums no curvature in step()."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    from ginger_hf.distributed import check_accelerate_supported, trainer_curvature_group

    config = Path(__file__).resolve().parents[1] / "recipes" / "accelerate" / "fsdp2_multi_gpu_bf16.yaml"
    args, _, _ = _validate_launch_command(launch_command_parser().parse_args(["--config_file", str(config), "x.py"]))
    env = prepare_multi_gpu_env(args)
    assert (env["ACCELERATE_USE_FSDP"], env["FSDP_VERSION"], env["ACCELERATE_MIXED_PRECISION"]) == ("true", "2", "bf16")
    for key, value in env.items():
        if key.startswith("FSDP_"):
            monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.reshard_after_forward is True
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    # accelerate enters FSDP only on GPUs; record the state it would.
    monkeypatch.setitem(PartialState._shared_state, "distributed_type", DistributedType.FSDP)
    monkeypatch.setitem(AcceleratorState._shared_state, "fsdp_plugin", plugin)
    check_accelerate_supported()
    assert trainer_curvature_group() is None  # FSDP2 sums mc curvature by reduce-scatter, before step()
    monkeypatch.setattr(plugin, "fsdp_version", 1)
    with pytest.raises(TypeError, match="FSDP1"):
        check_accelerate_supported()
