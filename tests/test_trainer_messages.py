"""What a Trainer user reads: the line naming Ginger and its settings, the warning on a resume with other
settings, and the ``--optim_target_modules`` syntax (comma lists) and its error."""

from __future__ import annotations

import logging

import pytest
import transformers
from helpers import COMMON_ARGS, causal_data, seq2seq_data, tiny_gpt2, tiny_t5
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainingArguments

import ginger_hf  # noqa: F401  (registers --optim ginger)
from ginger_hf import unwrap_ginger


@pytest.fixture
def ginger_log():
    """Records of the ``transformers.trainer.ginger`` logger at the verbosity a Trainer script sets (info)."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.trainer.ginger")
    logger.addHandler(handler)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_info()
    yield records
    transformers.logging.set_verbosity(verbosity)
    logger.removeHandler(handler)


def parse(tmp_path, *argv, cls=TrainingArguments):
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(["--output_dir", str(tmp_path), *COMMON_ARGS, *argv])
    return args


def test_building_the_optimizer_logs_ginger_its_preset_and_what_differs(tmp_path, ginger_log):
    args = parse(tmp_path, "--optim", "ginger", "--optim_args", "preset=paper,tau=8,curvature=empirical",
                 "--learning_rate", "5e-4")
    Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data()).create_optimizer()
    lines = [r.getMessage() for r in ginger_log if r.levelno == logging.INFO]
    assert len(lines) == 1
    line = lines[0]
    assert "Ginger (preset='paper')" in line and "lr=0.0005" in line
    assert "tau=8" in line and "curvature='empirical'" in line
    assert "power" not in line and "damping" not in line  # the preset's own values are not repeated


def test_the_log_line_counts_the_adamw_part_of_a_target_modules_split(tmp_path, ginger_log):
    args = parse(tmp_path, "--optim", "ginger", "--optim_target_modules", "q,v", cls=Seq2SeqTrainingArguments)
    Seq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data()).create_optimizer()
    (line,) = [r.getMessage() for r in ginger_log if r.levelno == logging.INFO]
    assert "settings that differ from the preset: none" in line
    assert "12 tensors take Ginger steps, 35 take AdamW steps" in line


def _resume(tmp_path, first_args: str, second_args: str):
    def trainer(out, optim_args):
        args = parse(out, "--optim", "ginger", "--optim_args", optim_args, "--max_steps", "4", "--save_strategy",
                     "steps", "--save_steps", "2", "--per_device_train_batch_size", "4", "--learning_rate", "1e-3")
        return Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data())

    trainer(tmp_path / "a", first_args).train()
    resumed = trainer(tmp_path / "b", second_args)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    return unwrap_ginger(resumed.optimizer)


def test_resuming_with_other_settings_warns_which_are_used(tmp_path, ginger_log):
    ginger = _resume(tmp_path, "tau=2,curvature=empirical", "tau=3,curvature=empirical,curvature_interval=2")
    warnings = [r.getMessage() for r in ginger_log if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "the checkpoint's are used" in warnings[0]
    assert "tau=2 (requested 3)" in warnings[0] and "curvature_interval=4 (requested 2)" in warnings[0]
    assert "curvature=" not in warnings[0]  # the same in both
    assert "the requested 'mean' is used" in warnings[0]  # the one setting a checkpoint does not hold
    assert {(g["tau"], g["curvature_interval"]) for g in ginger.param_groups} == {(2, 4)}  # torch semantics


def test_resuming_with_the_same_settings_is_silent(tmp_path, ginger_log):
    _resume(tmp_path, "tau=2,curvature=empirical", "tau=2,curvature=empirical")
    assert not [r for r in ginger_log if r.levelno == logging.WARNING]


# -- --optim_target_modules ------------------------------------------------------------------


def _ginger_names(tmp_path, target_modules: str) -> set[str]:
    model = tiny_t5()
    args = parse(tmp_path, "--optim", "ginger", "--optim_target_modules", target_modules, cls=Seq2SeqTrainingArguments)
    ginger = unwrap_ginger(Seq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_data()).create_optimizer())
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for g in ginger.param_groups if g["algorithm"] == "ginger" for p in g["params"]}


def test_a_comma_separated_list_selects_what_the_regex_alternative_selects(tmp_path):
    by_comma, by_bar = _ginger_names(tmp_path, "q,v"), _ginger_names(tmp_path, "q|v")
    assert by_comma == by_bar and len(by_comma) == 12
    assert all(n.endswith((".q.weight", ".v.weight")) for n in by_comma)
    # a comma inside {m,n} stays in its regex: layer 0 of each block only, then every v
    some = _ginger_names(tmp_path, r"block\.[0-9]{1,2}\.layer\.0\.SelfAttention\.q,v")
    assert {n for n in some if n.endswith(".q.weight")} == {
        n for n in by_comma if n.endswith(".q.weight") and "SelfAttention" in n}


def test_target_modules_that_select_nothing_name_the_syntax_and_the_modules(tmp_path):
    args = parse(tmp_path, "--optim", "ginger", "--optim_target_modules", "query,value", cls=Seq2SeqTrainingArguments)
    trainer = Seq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data())
    with pytest.raises(ValueError, match="selects no trainable parameter") as error:
        trainer.create_optimizer()
    message = str(error.value)
    assert "'q,v' or 'q|v'" in message and "all-linear" in message
    for module in ("SelfAttention.q", "SelfAttention.v", "DenseReluDense.wi", "shared"):
        assert module in message
