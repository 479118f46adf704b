"""`--optim ginger` in the stock Trainer / Seq2SeqTrainer: training, optim_args, sampled-label curvature, logs.

Registration itself (lazy, eager, failing) is tested in test_registration.py."""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    COMMON_ARGS, causal_data, classification_data, reference_curvature, seq2seq_data, tiny_gpt2, tiny_gpt2_classifier,
    tiny_llama, tiny_t5,
)
from transformers import (
    HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, Trainer, TrainerCallback, TrainingArguments,
)
import ginger_hf
import ginger_hf.curvature
from ginger_hf import get_curvature, unwrap_ginger
from ginger_hf.optim_args import OPTIM_ARGS, parse_optim_args
from ginger_hf.trainer import TrainerGinger


def parse(tmp_path, *argv, cls=TrainingArguments):
    (args,) = HfArgumentParser(cls).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), *COMMON_ARGS, *argv]
    )
    return args


def train_losses(trainer) -> list[float]:
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


# -- end-to-end training ----------------------------------------------------


def test_seq2seq_trainer_trains_tiny_t5_from_command_line(tmp_path):
    args = parse(
        tmp_path, "--optim", "ginger", "--optim_args", "tau=2,curvature=mc", "--max_steps", "30",
        "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "5",
        cls=Seq2SeqTrainingArguments,
    )
    trainer = Seq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data())
    losses = train_losses(trainer)
    ginger = unwrap_ginger(trainer.optimizer)
    assert type(ginger) is TrainerGinger
    assert ginger.param_groups[0]["tau"] == 2 and ginger.param_groups[0]["curvature"] == "mc"
    assert all(st["step"] == 30 for st in ginger.state.values())
    assert len(losses) == 6 and losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("make_model", [tiny_gpt2, tiny_llama])
def test_causal_lm_trainer_trains_tiny_decoder(tmp_path, make_model):
    args = parse(
        tmp_path, "--optim", "ginger", "--optim_args", "tau=2,curvature=mc", "--max_steps", "30",
        "--per_device_train_batch_size", "8", "--learning_rate", "3e-3", "--logging_steps", "5",
    )
    trainer = Trainer(model=make_model(), args=args, train_dataset=causal_data())
    losses = train_losses(trainer)
    assert type(unwrap_ginger(trainer.optimizer)) is TrainerGinger
    assert len(losses) == 6 and losses[-1] < 0.85 * losses[0], losses


def test_sequence_classification_trains_in_mc_mode(tmp_path):
    args = parse(tmp_path, "--optim", "ginger", "--max_steps", "4", "--per_device_train_batch_size", "8")
    trainer = Trainer(model=tiny_gpt2_classifier(num_labels=3), args=args, train_dataset=classification_data())
    trainer.train()
    ginger = unwrap_ginger(trainer.optimizer)
    assert ginger.param_groups[0]["curvature"] == "mc"
    assert max(st["s"].max().item() for st in ginger.state.values()) > 0  # curvature reached the model


def test_regression_head_in_mc_mode_points_to_empirical(tmp_path):
    data = classification_data(num_labels=1)
    args = parse(tmp_path, "--optim", "ginger", "--max_steps", "2", "--per_device_train_batch_size", "8")
    trainer = Trainer(model=tiny_gpt2_classifier(num_labels=1), args=args, train_dataset=data)
    with pytest.raises(ValueError, match="curvature=empirical"):
        trainer.create_optimizer()
    args = parse(tmp_path, "--optim", "ginger", "--optim_args", "curvature=empirical", "--max_steps", "2",
                 "--per_device_train_batch_size", "8")
    trainer = Trainer(model=tiny_gpt2_classifier(num_labels=1), args=args, train_dataset=data)
    trainer.train()
    assert all(st["step"] == 2 for st in unwrap_ginger(trainer.optimizer).state.values())


def test_label_smoothing_in_mc_mode_points_to_empirical(tmp_path):
    args = parse(tmp_path, "--optim", "ginger", "--max_steps", "1", "--label_smoothing_factor", "0.1")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data())
    with pytest.raises(ValueError, match="curvature=empirical"):
        trainer.train()


# -- optim_args -------------------------------------------------------------------------------


def test_misspelled_optim_arg_raises_listing_valid_keys(tmp_path):
    args = parse(tmp_path, "--optim", "ginger", "--optim_args", "tua=3")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data())
    with pytest.raises(ValueError, match="tua") as err:
        trainer.create_optimizer()
    for key in OPTIM_ARGS:
        assert key in str(err.value)


@pytest.mark.parametrize("bad", ["tau=abc", "rho=big", "curvature=exact", "log_stats=maybe", "betas=0.9",
                                 "state_dtype=int8", "lora_blocks=fused", "tau=0", "damping=-1"])
def test_bad_optim_arg_values_raise_value_error_when_optimizer_is_built(tmp_path, bad):
    args = parse(tmp_path, "--optim", "ginger", "--optim_args", bad)
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data())
    with pytest.raises(ValueError, match=bad.split("=")[0]):
        trainer.create_optimizer()


def test_optim_args_are_typed():
    parsed = parse_optim_args(
        "tau=8,damping=1e-4,rho=none,betas=0.8:0.95,beta1=0.7,curvature=empirical,curvature_interval=2,"
        "state_dtype=bfloat16,lora_blocks=joint,log_stats=true"
    )
    assert parsed == dict(
        tau=8, damping=1e-4, rho=None, betas=(0.8, 0.95), beta1=0.7, curvature="empirical", curvature_interval=2,
        state_dtype=torch.bfloat16, lora_blocks="joint", log_stats=True,
    )
    assert type(parsed["tau"]) is int and type(parsed["damping"]) is float


def test_hyperparameters_come_from_training_arguments(tmp_path):
    args = parse(
        tmp_path, "--optim", "ginger", "--optim_args", "tau=3,damping=1e-3,rho=none,curvature_interval=2",
        "--learning_rate", "5e-4", "--weight_decay", "0.1", "--adam_beta1", "0.8", "--adam_beta2", "0.97",
    )
    model = tiny_gpt2()
    ginger = unwrap_ginger(Trainer(model=model, args=args, train_dataset=causal_data()).create_optimizer())
    decay = {id(p): g["weight_decay"] for g in ginger.param_groups for p in g["params"]}
    names = dict(model.named_parameters())
    assert decay[id(names["transformer.h.0.attn.c_attn.weight"])] == 0.1
    assert decay[id(names["transformer.h.0.attn.c_attn.bias"])] == 0.0
    assert decay[id(names["transformer.h.0.ln_1.weight"])] == 0.0
    for g in ginger.param_groups:
        assert (g["lr"], g["betas"], g["tau"], g["damping"], g["rho"], g["curvature_interval"]) == (
            5e-4, (0.8, 0.99), 3, 1e-3, None, 2,  # beta2: the preset's, not --adam_beta2 (Adam's second moment)
        )
    args = parse(tmp_path, "--optim", "ginger", "--optim_args", "beta2=0.99", "--adam_beta1", "0.8")
    ginger = unwrap_ginger(Trainer(model=model, args=args, train_dataset=causal_data()).create_optimizer())
    assert ginger.param_groups[0]["betas"] == (0.8, 0.99)
    args = parse(tmp_path, "--optim", "ginger", "--optim_args", "beta2=0.95", "--adam_beta1", "0.8",
                 "--adam_beta2", "0.97")
    ginger = unwrap_ginger(Trainer(model=model, args=args, train_dataset=causal_data()).create_optimizer())
    assert ginger.param_groups[0]["betas"] == (0.8, 0.95)  # optim_args sets beta2


# -- the sampled-label curvature pass -----------------------------------------------------------


def count_gradient_computations(tmp_path, optim_args, steps, accumulation):
    model = tiny_t5()
    param = model.encoder.block[0].layer[0].SelfAttention.q.weight
    calls = []
    param.register_hook(lambda g: calls.append(1))
    args = parse(
        tmp_path, "--optim", "ginger", "--optim_args", optim_args, "--max_steps", str(steps),
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", str(accumulation),
        "--learning_rate", "1e-3", cls=Seq2SeqTrainingArguments,
    )
    Seq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_data()).train()
    return len(calls)


def test_mc_mode_takes_two_gradients_per_micro_batch(tmp_path):
    assert count_gradient_computations(tmp_path, "curvature=mc,curvature_interval=1", steps=10, accumulation=2) == 2 * 20


def test_empirical_mode_takes_one_gradient_per_micro_batch(tmp_path):
    assert count_gradient_computations(tmp_path, "curvature=empirical", steps=10, accumulation=2) == 20


def test_curvature_interval_skips_the_extra_backward(tmp_path):
    # refreshes at steps 1, 4, ..., 28: 10 extra gradients over 30 steps
    assert count_gradient_computations(tmp_path, "curvature=mc,curvature_interval=3", steps=30, accumulation=1) == 40


class CaptureBeforeStep(TrainerCallback):
    """Parameters, curvature vectors and gradient norm as ``optimizer.step()`` will see them."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        params = dict(model.named_parameters())
        grads = [p.grad for p in params.values() if p.grad is not None]
        self.steps.append({
            "params": {n: p.detach().clone() for n, p in params.items()},
            "curvature": {n: get_curvature(p).clone() for n, p in params.items() if get_curvature(p) is not None},
            "grad_norm": torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item(),
        })


def run_and_check_curvature(tmp_path, monkeypatch, make_model, data, trainer_cls, shift, *extra, steps=3,
                            optim_args="curvature_interval=1"):
    """Train with gradient accumulation 2, a curvature refresh every step, and compare each step's
    curvature vectors with an independent computation: same parameters, same micro-batches, same
    sampled labels, and the optimizer's ``curvature_scale`` (``/ N`` or ``/ sqrt(N)``)."""
    model = make_model()
    reference = copy.deepcopy(model)
    batches, sampled = [], []
    model.register_forward_pre_hook(
        lambda m, a, kw: batches.append({k: v.clone() for k, v in kw.items()  # the model's inputs and labels
                                         if isinstance(v, torch.Tensor) and k != "num_items_in_batch"})
        if m.training else None,
        with_kwargs=True,
    )
    real_sample = ginger_hf.curvature.sample_labels

    def spy(*a, **kw):
        out = real_sample(*a, **kw)
        sampled.append(out.clone())
        return out

    monkeypatch.setattr(ginger_hf.curvature, "sample_labels", spy)
    capture = CaptureBeforeStep()
    args = parse(
        tmp_path, "--optim", "ginger", "--optim_args", optim_args, "--max_steps", str(steps),
        "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", *extra,
        cls=Seq2SeqTrainingArguments,
    )
    trainer = trainer_cls(model=model, args=args, train_dataset=data, callbacks=[capture])
    trainer.train()
    scale = unwrap_ginger(trainer.optimizer).curvature_scale
    assert len(batches) == len(sampled) == 2 * steps

    worst = 0.0
    for step, seen in enumerate(capture.steps):
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.copy_(seen["params"][name])
        micro = [2 * step, 2 * step + 1]
        expected = reference_curvature(reference, [batches[i] for i in micro], [sampled[i] for i in micro],
                                       shift=shift, scale=scale)
        assert set(seen["curvature"]) == set(expected)
        for name, c in seen["curvature"].items():
            worst = max(worst, (c - expected[name]).abs().max().item())
        assert sum(c.norm() ** 2 for c in seen["curvature"].values()) ** 0.5 > 0.1
    assert worst < 1e-5, worst
    return capture, scale


@pytest.mark.parametrize("optim_args,scale", [("curvature_interval=1", "mean"),
                                              ("curvature_interval=1,curvature_scale=sqrt", "sqrt")])
def test_trainer_curvature_matches_independent_computation_seq2seq(tmp_path, monkeypatch, optim_args, scale):
    _, used = run_and_check_curvature(tmp_path, monkeypatch, tiny_t5, seq2seq_data(), Seq2SeqTrainer, False,
                                      optim_args=optim_args)
    assert used == scale  # "mean" (/ N) is the recommended preset's; "sqrt" (/ sqrt(N)) the paper's


def test_trainer_curvature_matches_independent_computation_causal_lm(tmp_path, monkeypatch):
    run_and_check_curvature(tmp_path, monkeypatch, tiny_llama, causal_data(), Trainer, True)


def test_gradient_clipping_leaves_curvature_unclipped(tmp_path, monkeypatch):
    capture, _ = run_and_check_curvature(
        tmp_path, monkeypatch, tiny_t5, seq2seq_data(), Seq2SeqTrainer, False, "--max_grad_norm", "1e-4"
    )
    for seen in capture.steps:
        assert seen["grad_norm"] <= 1.01e-4
        assert sum(c.norm() ** 2 for c in seen["curvature"].values()) ** 0.5 > 1e3 * 1e-4


# -- activation (gradient) checkpointing --------------------------------------------------------


def curvature_per_step(tmp_path, *extra, steps=3) -> list[dict[str, torch.Tensor]]:
    capture = CaptureBeforeStep()
    args = parse(
        tmp_path, "--optim", "ginger", "--optim_args", "curvature_interval=1", "--max_steps", str(steps),
        "--per_device_train_batch_size", "4",
        "--gradient_accumulation_steps", "2", "--learning_rate", "1e-3", *extra, cls=Seq2SeqTrainingArguments,
    )
    Seq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data(), callbacks=[capture]).train()
    return [seen["curvature"] for seen in capture.steps]


def test_non_reentrant_gradient_checkpointing_gives_the_same_curvature(tmp_path):
    plain = curvature_per_step(tmp_path)
    checkpointed = curvature_per_step(
        tmp_path, "--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"use_reentrant": false}'
    )
    assert len(plain) == len(checkpointed) == 3
    for a, b in zip(plain, checkpointed):
        assert a.keys() == b.keys() and len(a) == len(list(tiny_t5().parameters()))
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-7)


def test_reentrant_gradient_checkpointing_is_refused_naming_the_fix(tmp_path):
    args = parse(tmp_path, "--optim", "ginger", "--max_steps", "1", "--per_device_train_batch_size", "4",
                 "--gradient_checkpointing", "true", "--gradient_checkpointing_kwargs", '{"use_reentrant": true}',
                 cls=Seq2SeqTrainingArguments)
    trainer = Seq2SeqTrainer(model=tiny_t5(), args=args, train_dataset=seq2seq_data())
    with pytest.raises(RuntimeError, match="use_reentrant") as err:
        trainer.train()
    assert '{"use_reentrant": False}' in str(err.value) and "curvature=empirical" in str(err.value)


# -- diagnostics --------------------------------------------------------------------------------


def test_log_stats_reach_the_trainer_logs(tmp_path):
    args = parse(
        tmp_path, "--optim", "ginger", "--optim_args", "log_stats=true,tau=2,curvature_interval=1", "--max_steps", "6",
        "--logging_steps", "3", "--per_device_train_batch_size", "4",
    )
    capture = CaptureBeforeStep()
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data(), callbacks=[capture])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [3, 6]
    keys = {"update_to_grad", "span_share", "clipped_fraction", "s_mean", "s_max", "curvature_norm", "skipped_blocks",
            "skipped_curvature"}
    assert all({k for k in h if k.startswith("ginger/")} == {f"ginger/{k}" for k in keys} for h in logs)
    ginger = unwrap_ginger(trainer.optimizer)
    s = torch.cat([st["s"].reshape(-1) for st in ginger.state.values()])
    assert logs[-1]["ginger/s_max"] == pytest.approx(s.max().item())
    assert logs[-1]["ginger/s_mean"] == pytest.approx(s.mean().item())
    last = capture.steps[-1]["curvature"]  # the vectors step 6 refreshed from
    last_norm = sum(c.double().norm() ** 2 for c in last.values()).item() ** 0.5
    assert logs[-1]["ginger/curvature_norm"] == pytest.approx(last_norm)
    assert logs[-1]["ginger/skipped_blocks"] == logs[-1]["ginger/skipped_curvature"] == 0
    assert logs[-1]["ginger/clipped_fraction"] == 0  # rho=None in the recommended preset
    assert 0 < logs[-1]["ginger/span_share"] <= 1 + 1e-6 and logs[-1]["ginger/update_to_grad"] > 0
    assert logs[0]["ginger/s_max"] != logs[-1]["ginger/s_max"]

    args = parse(tmp_path, "--optim", "ginger", "--max_steps", "3", "--logging_steps", "3")
    trainer = Trainer(model=tiny_gpt2(), args=args, train_dataset=causal_data())
    trainer.train()
    assert not any(k.startswith("ginger/") for h in trainer.state.log_history for k in h)
