"""`python -m ginger_hf.run SCRIPT.py --optim ginger ...` runs an unmodified script that never imports ginger_hf."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from helpers import free_port

SCRIPT = textwrap.dedent(
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments

    def main():
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2)
        model = GPT2LMHeadModel(config)
        data = [{"input_ids": (torch.arange(16) + i) % 50, "labels": (torch.arange(16) + i) % 50} for i in range(32)]
        trainer = Trainer(model=model, args=args, train_dataset=data)
        trainer.train()
        # one write per line: under torchrun both ranks share this stdout
        line = f"RESULT {args.optim.value} {type(trainer.optimizer.optimizer).__name__} {trainer.state.global_step}"
        print(line, flush=True)

    if __name__ == "__main__":
        main()
    """
)

ARGS = ["--optim", "ginger", "--optim_args", "tau=2", "--max_steps", "3", "--per_device_train_batch_size", "4",
        "--report_to", "none", "--use_cpu", "--save_strategy", "no", "--disable_tqdm", "true"]


def run(cmd, cwd, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "train_script.py"
    path.write_text(SCRIPT)
    return path


def test_launcher_runs_unmodified_script_with_optim_ginger(tmp_path, script):
    out = run([sys.executable, "-m", "ginger_hf.run", str(script), "--output_dir", str(tmp_path / "o"), *ARGS], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT ginger TrainerGinger 3" in out.stdout


@pytest.mark.slow
def test_launcher_runs_a_module_and_the_script_alone_rejects_ginger(tmp_path, script):
    out = run([sys.executable, "-m", "ginger_hf.run", "-m", "train_script", "--output_dir", str(tmp_path / "o"), *ARGS],
              tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT ginger TrainerGinger 3" in out.stdout
    # without the launcher the same command line is rejected: the launcher is what registers
    out = run([sys.executable, str(script), "--output_dir", str(tmp_path / "o"), *ARGS], tmp_path)
    assert out.returncode != 0 and "invalid choice: 'ginger'" in out.stderr


@pytest.mark.slow
def test_launcher_under_torchrun(tmp_path, script):
    port = free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "ginger_hf.run", str(script), "--output_dir", str(tmp_path / "o"), "--ddp_backend", "gloo", *ARGS]
    out = run(cmd, tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("RESULT ginger TrainerGinger 3") == 2


@pytest.mark.slow
def test_launcher_under_accelerate_launch(tmp_path, script):
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    cmd = [accelerate, "launch", "--cpu", "--num_processes", "1", "-m", "ginger_hf.run", str(script),
           "--output_dir", str(tmp_path / "o"), *ARGS]
    out = run(cmd, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RESULT ginger TrainerGinger 3" in out.stdout
