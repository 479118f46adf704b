"""accelerate's FSDP2 with Ginger under ``torchrun --nproc_per_node 2`` (CPU, gloo): the stock Trainer with ``--fsdp``
and ``--optim ginger``, the summarization recipe with ``--fsdp``, and recipes/accelerate/plain_loop.py.

accelerate enables FSDP only for GPU-like process types, so the worker (tests/dist/fsdp_trainer_worker.py) switches
its state to FSDP with the FSDP2 plugin of the Trainer (or of recipes/accelerate/fsdp2_multi_gpu_bf16.yaml); from
there on accelerate's real FSDP2 path runs (``fully_shard``, the optimizer's param_groups swapped to the sharded
DTensors afterwards, FSDP state-dict checkpoints).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_ddp import launch
from test_ddp_recipes import run as run_plain_loop_ddp
from test_recipes import tiny_local  # noqa: F401  (the fixture: a tiny local T5, tokenizer and data)

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "fsdp_trainer_worker.py"
pytestmark = pytest.mark.slow


def run(out: Path, *args: str) -> list[dict]:
    return launch(out, *args, worker=WORKER)


def rel(a: dict, b: dict, keys) -> float:
    keys = list(keys)
    assert keys
    return max(((a[k].double() - b[k].double()).norm() / b[k].double().norm().clamp_min(1e-30)).item() for k in keys)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    """T5, mc curvature, 6 steps of 2 micro-batches per rank, a SHARDED_STATE_DICT checkpoint at step 3."""
    out = tmp_path_factory.mktemp("fsdp")
    return out, run(out, "--save-steps", "3")


def test_trainer_fsdp2_shards_ginger_and_matches_ddp(fsdp_run, tmp_path):
    """Same micro-batches and sampled labels (each rank's RNG, seeded alike) under DDP and FSDP2: same training."""
    _, ranks = fsdp_run
    for r in ranks:
        assert r["distributed_type"].endswith("FSDP") and r["world"] == 2
        assert r["sharded_params"] > 0 and r["optimizer_holds_sharded"]  # accelerate swapped in the DTensors
        assert not r["curvature_group"]  # FSDP2: summed by the reduce-scatter, never all-reduced in step()
        assert r["hook_last"]  # the curvature hook runs after FSDP2's post-forward hook
        assert r["steps"] == [6]
    ddp = run(tmp_path, "--no-fsdp")[0]
    assert ddp["distributed_type"].endswith("MULTI_CPU") and ddp["curvature_group"] and ddp["sharded_params"] == 0
    got, ref = ranks[0]["snapshot"], ddp["snapshot"]
    assert got.keys() == ref.keys()
    initial = {"param/" + n: p.detach() for n, p in tiny.tiny_t5(seed=0, dropout=0.0).named_parameters()}
    assert rel(ref, initial, initial) > 1e-2  # it trained
    assert rel(got, ref, initial) <= 1e-5
    # U and R are one factorisation of each block's curvature model among many; m, s and e are not
    assert rel(got, ref, [k for k in ref if k.split("/")[-1] in ("m", "s", "e")]) <= 1e-4


def test_trainer_fsdp2_resume_from_checkpoint_is_exact(fsdp_run, tmp_path):
    out, ranks = fsdp_run
    checkpoint = out / "run" / "checkpoint-3"
    assert (checkpoint / "optimizer_0").is_dir() and (checkpoint / "rng_state_1.pth").exists()
    resumed = run(tmp_path, "--resume", str(checkpoint))
    for r, straight in zip(resumed, ranks):
        assert r["steps"] == [6]
        assert tiny.max_abs_diff(r["snapshot"], straight["snapshot"]) <= 1e-6


def test_trainer_fsdp2_full_state_dict_checkpoint_resumes_exactly(tmp_path):
    """FULL_STATE_DICT (the Trainer's default) gathers Ginger's sharded state into one file and scatters it back.
    A causal LM without tied weights: torch cannot load T5's tied aliases from a full model state dict."""
    args = ("--model", "llama", "--state-dict-type", "FULL_STATE_DICT", "--steps", "4")
    straight = run(tmp_path / "a", *args, "--save-steps", "2")
    checkpoint = tmp_path / "a" / "run" / "checkpoint-2"
    assert (checkpoint / "optimizer.bin").exists()
    saved = torch.load(checkpoint / "optimizer.bin", weights_only=False)["state"]
    assert all(not hasattr(v, "device_mesh") for st in saved.values() for v in st.values())  # full tensors
    resumed = run(tmp_path / "b", *args, "--resume", str(checkpoint))
    for r, s in zip(resumed, straight):
        assert r["steps"] == [4] and s["optimizer_holds_sharded"]
        assert tiny.max_abs_diff(r["snapshot"], s["snapshot"]) <= 1e-6


def test_summarization_recipe_with_fsdp(tiny_local, tmp_path):  # noqa: F811
    out = tmp_path / "recipe"
    ranks = launch(out, "--recipe", str(tiny_local), worker=WORKER)
    results = ranks[0]["results"]
    assert ranks[0]["world"] == 2 and results["train_samples"] == 16
    assert 0.0 <= results["predict_rouge1"] <= 100.0 and (out / "model.safetensors").exists()
    assert len((out / "generated_predictions.txt").read_text().splitlines()) == 6


def run_plain_loop_fsdp(*args: str) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(tiny.free_port()), str(WORKER), "--plain-loop", "--cpu", "--batch_size", "4", *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def last_loss(stdout: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 1  # printed by the main process only
    return lines[0]


def test_plain_accelerate_loop_with_fsdp2_matches_ddp_and_resumes(tmp_path):
    """plain_loop.py unchanged: sync_curvature records the FSDP2 model; each rank draws its labels from its own
    RNG as under DDP, so the losses agree (printed to 4 decimals: a curvature that is not summed over the ranks
    moves the step-8 loss by 1e-2). accelerator.save_state/load_state carry Ginger's sharded state."""
    straight = last_loss(run_plain_loop_fsdp("--steps", "8"))
    assert straight.startswith("step 8: loss")
    assert last_loss(run_plain_loop_ddp("--steps", "8", nproc=2)) == straight
    run_plain_loop_fsdp("--steps", "4", "--save_dir", str(tmp_path / "ckpt"))
    assert (tmp_path / "ckpt" / "optimizer_0").is_dir()  # SHARDED_STATE_DICT: torch.distributed.checkpoint
    assert last_loss(run_plain_loop_fsdp("--steps", "8", "--resume_from", str(tmp_path / "ckpt"))) == straight
