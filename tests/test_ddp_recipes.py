"""recipes/accelerate: the accelerate configs say what the README claims, and the plain-loop example runs
on 2 processes under torchrun (gloo). Exact resume of the same loop is tested in test_resume_accelerate.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "accelerate"


@pytest.mark.parametrize("name,kind,processes", [("single_gpu_bf16", "NO", 1), ("multi_gpu_ddp_bf16", "MULTI_GPU", 2)])
def test_accelerate_configs_load(name, kind, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(RECIPES / f"{name}.yaml"))
    assert str(config.distributed_type.value if hasattr(config.distributed_type, "value") else config.distributed_type) == kind
    assert str(config.mixed_precision.value if hasattr(config.mixed_precision, "value") else config.mixed_precision) == "bf16"
    assert config.num_processes == processes and not config.use_cpu


def run(*args: str, nproc: int = 0) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = [sys.executable]
    if nproc:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr", "127.0.0.1",
                     "--master_port", str(tiny.free_port())]
    proc = subprocess.run([*launcher, str(RECIPES / "plain_loop.py"), "--cpu", "--batch_size", "4", *args],
                          env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_plain_loop_example_runs_on_two_processes(tmp_path):
    out = run("--steps", "4", "--save_dir", str(tmp_path / "ddp"), nproc=2)
    assert out.count("step 4: loss") == 1  # printed by the main process only
    assert (tmp_path / "ddp" / "model.safetensors").exists()
