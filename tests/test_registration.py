"""Registration of `--optim ginger`: lazy (``import ginger_hf`` imports no transformers module), eager
(``ginger_hf.register()``), and what happens when transformers' internals no longer fit.

The lazy cases run in fresh interpreters: this process imported transformers long ago.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import COMMON_ARGS
from transformers import HfArgumentParser, Seq2SeqTrainingArguments, TrainingArguments
from transformers.training_args import OptimizerNames

import ginger_hf

TESTS = Path(__file__).parent

# One Ginger step with sampled-label curvature on a linear softmax classifier; prints the state's step count.
GINGER_STEP = textwrap.dedent(
    """
    import torch
    from ginger_hf import Ginger, add_sampled_label_curvature

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = Ginger(model.parameters(), lr=1e-2)
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    logits = model(x)
    add_sampled_label_curvature(logits, y, opt)
    torch.nn.functional.cross_entropy(logits, y).backward()
    before = model.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.weight) and opt.state[model.weight]["s"].max() > 0
    print("STEP", opt.state[model.weight]["step"], flush=True)
    """
)


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": str(TESTS)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_register_is_idempotent_and_args_accept_ginger(tmp_path):
    ginger_hf.register()
    ginger_hf.register()
    assert [m.value for m in OptimizerNames].count("ginger") == 1
    assert OptimizerNames("ginger") is OptimizerNames.GINGER
    assert TrainingArguments(output_dir=str(tmp_path), optim="ginger").optim == OptimizerNames.GINGER
    assert Seq2SeqTrainingArguments(output_dir=str(tmp_path), optim="ginger").optim == "ginger"
    with pytest.raises(SystemExit):  # the parser still validates choices
        HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
            ["--output_dir", str(tmp_path), *COMMON_ARGS, "--optim", "gingr"]
        )


def test_ginger_works_where_transformers_cannot_be_imported():
    blocker = textwrap.dedent(
        """
        import importlib.abc, sys

        class NoTransformers(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "transformers":
                    raise ImportError(f"blocked for this test: {name}")

        sys.meta_path.insert(0, NoTransformers())
        try:
            import transformers
        except ImportError:
            pass
        else:
            raise SystemExit("the blocker let transformers through")
        import ginger_hf
        """
    )
    check = "\nimport sys\nassert not [m for m in sys.modules if m.split('.')[0] == 'transformers']\n"
    out = run_python(blocker + GINGER_STEP + check)
    assert "STEP 1" in out.stdout


def test_optim_ginger_works_when_ginger_hf_is_imported_before_transformers(tmp_path):
    code = textwrap.dedent(
        f"""
        import sys
        import ginger_hf
        assert not [m for m in sys.modules if m.split(".")[0] == "transformers"], "import ginger_hf loaded transformers"

        from helpers import COMMON_ARGS, causal_data, tiny_gpt2
        from transformers import HfArgumentParser, Trainer, TrainingArguments

        argv = ["--output_dir", {str(tmp_path)!r}, *COMMON_ARGS, "--optim", "ginger", "--optim_args", "tau=2",
                "--max_steps", "2", "--per_device_train_batch_size", "4"]
        (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(argv)
        trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data(16))
        trainer.train()
        callbacks = sorted(type(c).__name__ for c in trainer.callback_handler.callbacks if "Ginger" in type(c).__name__)
        ginger = ginger_hf.unwrap_ginger(trainer.optimizer)
        print("RESULT", args.optim.value, type(ginger).__name__, trainer.state.global_step, *callbacks, flush=True)
        """
    )
    out = run_python(code)
    assert "RESULT ginger TrainerGinger 2 GingerAmpCallback GingerStatsCallback" in out.stdout


def test_register_names_the_changed_internal(monkeypatch):
    from transformers import trainer_optimizer

    monkeypatch.delattr(trainer_optimizer, "_OPTIMIZER_HANDLERS")
    with pytest.raises(RuntimeError, match="_OPTIMIZER_HANDLERS") as err:
        ginger_hf.register()
    assert "ginger_hf.Ginger(model.parameters()" in str(err.value)  # the way around it


def test_a_piece_that_cannot_register_warns_and_leaves_import_and_ginger_working(monkeypatch):
    import transformers.trainer  # noqa: F401  (loaded, so install() applies its piece at once)

    from ginger_hf import registration

    def changed(module):
        raise RuntimeError("DEFAULT_CALLBACKS moved (simulated)")

    monkeypatch.setitem(registration._PIECES, "transformers.trainer", changed)
    with pytest.warns(UserWarning, match="simulated"):
        registration.install()  # what `import ginger_hf` runs: warns, never raises
    with pytest.raises(RuntimeError, match="DEFAULT_CALLBACKS moved"):
        ginger_hf.register()
    exec(GINGER_STEP, {})  # plain Ginger does not care
    monkeypatch.undo()
    ginger_hf.register()  # back to a working registration for the other tests
    assert not registration._failures


def test_import_with_changed_internals_warns_and_register_raises_the_reason():
    code = textwrap.dedent(
        """
        import warnings
        from transformers import trainer_optimizer
        del trainer_optimizer._OPTIMIZER_HANDLERS  # as if a transformers release had moved it

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import ginger_hf
        assert any("_OPTIMIZER_HANDLERS" in str(w.message) for w in caught), [str(w.message) for w in caught]
        """
    ) + GINGER_STEP + textwrap.dedent(
        """
        try:
            ginger_hf.register()
        except RuntimeError as exc:
            print("REFUSED", exc, flush=True)
        """
    )
    out = run_python(code)
    assert "STEP 1" in out.stdout
    assert "REFUSED" in out.stdout and "_OPTIMIZER_HANDLERS" in out.stdout
