"""The package as a user installs it: a wheel in a fresh virtual environment, the repository off the path.

First with torch alone (``import ginger_hf``, the README's classifier example, ``register()`` and the
launcher refused naming the extra to install), then with the ``hf`` extra at the versions of ``constraints.txt``
(``--optim ginger`` in a stock Trainer on a tiny model, started through the launcher).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from ginger_hf import kernel

from test_readme import python_blocks

ROOT = Path(__file__).resolve().parent.parent
TORCH = "torch==2.13.0"  # what setup.sh installs on CPU machines (from pip's cache or find-links when there)

TORCH_ONLY = """
import sys, importlib.util, torch, ginger_hf
assert importlib.util.find_spec("transformers") is None, "transformers must not be installed here"
assert "site-packages" in ginger_hf.__file__, ginger_hf.__file__
p = torch.nn.Parameter(torch.randn(4, 3))
opt = ginger_hf.Ginger([p], lr=1e-2, curvature="empirical")
p.grad = torch.randn(4, 3)
before = p.detach().clone()
opt.step()
assert not torch.equal(before, p) and opt.state[p]["step"] == 1
import shutil
from ginger_hf import kernel
assert kernel.available() or shutil.which("g++") is None, "the C++ kernel did not build from the wheel's sources"
try:
    ginger_hf.register()
except ImportError as e:
    assert "ginger-hf[hf]" in str(e), e
else:
    raise AssertionError("register() without transformers must raise")
print("torch-only ok")
"""

TRAINER_SCRIPT = """
import logging, torch
from transformers import GPT2Config, GPT2LMHeadModel, HfArgumentParser, Trainer, TrainingArguments
import ginger_hf

(args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses()
torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=16, n_embd=16, n_layer=1, n_head=2))
data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 50, (32, 16))]
trainer = Trainer(model=model, args=args, train_dataset=data)
trainer.train()
ginger = ginger_hf.unwrap_ginger(trainer.optimizer)
assert type(ginger).__name__ == "TrainerGinger" and ginger.state
print("trainer ok", trainer.state.global_step, trainer.state.log_history[-1]["train_loss"])
"""


def _run(cmd, cwd, env, timeout=900):
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.mark.slow
def test_a_wheel_works_in_a_fresh_venv_with_torch_alone_then_with_the_hf_extra(tmp_path):
    source = tmp_path / "source"  # the wheel's inputs only: building in the clone would leave build/ there
    source.mkdir()
    shutil.copytree(ROOT / "ginger_hf", source / "ginger_hf", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"),
          str(source)], tmp_path, env)
    (wheel,) = (tmp_path / "dist").glob("ginger_hf-*.whl")
    files = zipfile.ZipFile(wheel).namelist()
    sources = {f"ginger_hf/{path.name}" for path in (kernel._SOURCE, *kernel._HEADERS)}
    assert sources | {"ginger_hf/trainer.py"} <= set(files)  # the kernel's sources: it is built on first use
    assert not [f for f in files if f.startswith("ginger_hf/") and not f.endswith((".py", ".cpp", ".h"))]  # no data
    assert not [f for f in files if "offline_tasks" in f or "recipes" in f]

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path, env)
    python = str(venv / "bin" / "python")
    work = tmp_path / "elsewhere"  # no repository on the path: not the cwd, not PYTHONPATH
    work.mkdir()
    _run([python, "-m", "pip", "install", "-q", TORCH], work, env)
    _run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], work, env)
    assert "torch-only ok" in _run([python, "-c", TORCH_ONLY], work, env)
    launcher = subprocess.run([python, "-m", "ginger_hf.run", "train.py"], cwd=work, env=env, capture_output=True,
                              text=True, timeout=300)
    assert launcher.returncode == 2 and "pip install 'ginger-hf[hf]'" in launcher.stderr, launcher.stderr
    example = next(b for b in python_blocks() if "add_sampled_label_curvature" in b and "Sequential" in b)
    out = _run([python, "-c", example], work, env)
    assert float(out.split("train accuracy")[1].split()[0]) > 0.8

    _run([python, "-m", "pip", "install", "-q", "-c", str(ROOT / "constraints.txt"), f"{wheel}[hf]"], work, env)
    (work / "train.py").write_text(TRAINER_SCRIPT)
    out = _run([python, "-m", "ginger_hf.run", "train.py", "--output_dir", str(work / "out"), "--optim", "ginger",
                "--optim_args", "tau=2", "--max_steps", "3", "--per_device_train_batch_size", "8", "--use_cpu",
                "--report_to", "none", "--save_strategy", "no", "--log_level", "info", "--disable_tqdm", "true"],
               work, env)
    assert "trainer ok 3" in out
    assert "Optimizer: Ginger (preset='recommended')" in out and "tau=2" in out
