"""LoRA / peft with `--optim ginger`: state only for trainable params, target-module split, joint LoRA blocks;
and the optimizer features they rest on (joint blocks, `algorithm="adamw"` groups)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from helpers import COMMON_ARGS, seq2seq_data, tiny_t5
from transformers import HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments

from ginger_hf import Ginger, set_curvature, unwrap_ginger
from ginger_hf.lora import param_roles


def lora_t5(modules_to_save=None):
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"], modules_to_save=modules_to_save,
                        task_type="SEQ_2_SEQ_LM")
    return get_peft_model(tiny_t5(), config)


def train(tmp_path, model, *argv, steps=3):
    (args,) = HfArgumentParser(Seq2SeqTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), *COMMON_ARGS, "--optim", "ginger", "--max_steps", str(steps),
         "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--adam_epsilon", "1e-7", *argv]
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=seq2seq_data(32))
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    return unwrap_ginger(trainer.optimizer), changed


def test_only_trainable_lora_params_carry_state(tmp_path):
    model = lora_t5()
    ginger, changed = train(tmp_path, model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    names = {id(p): n for n, p in model.named_parameters()}
    assert len(trainable) == 24 and all(".lora_" in n for n in trainable)
    assert {names[id(p)] for p in ginger.state} == trainable
    assert all({"m", "U", "s"} <= set(st) and st["step"] == 3 for st in ginger.state.values())
    assert changed == trainable  # frozen base weights untouched


def test_optim_target_modules_split_ginger_and_adamw(tmp_path):
    model = lora_t5(modules_to_save=["final_layer_norm"])
    ginger, changed = train(tmp_path, model, "--optim_target_modules", "q|v", "--weight_decay", "0.01",
                            "--adam_beta2", "0.95")
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    by_kind = {"ginger": set(), "adamw": set()}
    for p, st in ginger.state.items():
        kind = "ginger" if {"m", "U", "s"} <= set(st) else "adamw" if {"exp_avg", "exp_avg_sq"} <= set(st) else "?"
        by_kind[kind].add(names[id(p)])
    assert by_kind["ginger"] == {n for n in trainable if ".lora_" in n} and len(by_kind["ginger"]) == 24
    assert by_kind["adamw"] == {n for n in trainable if "modules_to_save" in n} and len(by_kind["adamw"]) == 2
    assert changed == trainable
    adamw_groups = [g for g in ginger.param_groups if g["algorithm"] == "adamw"]
    # --adam_epsilon feeds the AdamW part; --adam_beta2 never reaches the optimizer (beta2: the preset's)
    assert adamw_groups
    assert all((g["initial_lr"], g["eps"], g["betas"]) == (1e-3, 1e-7, (0.9, 0.99)) for g in adamw_groups)
    # the layer-norm copies are in the Trainer's no-decay group, LoRA matrices in the decay group
    assert {g["weight_decay"] for g in adamw_groups} == {0.0}
    assert {g["weight_decay"] for g in ginger.param_groups if g["algorithm"] == "ginger"} == {0.01}


def test_lora_blocks_joint_gives_one_block_per_lora_module(tmp_path):
    model = lora_t5()
    ginger, changed = train(tmp_path, model, "--optim_args", "lora_blocks=joint,tau=2")
    lora_modules = [m for m in model.modules() if isinstance(m, LoraLayer)]
    assert len(lora_modules) == 12
    assert len(ginger.state) == len(lora_modules)
    by_param = {id(p): st for p, st in ginger.state.items()}
    for module in lora_modules:
        a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
        st = by_param[id(a)]  # the block's state lives on its first parameter (A)
        assert st["m"].numel() == a.numel() + b.numel() and st["U"].shape == (2, a.numel() + b.numel())
        assert st["step"] == 3 and st["s"].max() > 0
        assert id(b) not in by_param
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}


def test_target_modules_matching_nothing_is_an_error():
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        param_roles(lora_t5(), "k|o")


# -- the optimizer features behind the split ---------------------------------------------------


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("curvature", ["mc", "empirical"])
def test_joint_block_equals_one_concatenated_parameter(curvature, backend):
    gen = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(3, 5, generator=gen))
    b = torch.nn.Parameter(torch.randn(4, 2, generator=gen))
    flat = torch.nn.Parameter(torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)]))
    hp = dict(lr=1e-2, tau=3, damping=1e-3, rho=None, weight_decay=0.1, curvature=curvature, curvature_interval=2,
              backend=backend)
    joint = Ginger([{"params": [a, b], "joint": True}], **hp)
    single = Ginger([flat], **hp)
    for _ in range(9):  # more refreshes than tau: truncation is exercised
        ga, gb, ca, cb = (torch.randn(t.shape, generator=gen) for t in (a, b, a, b))
        a.grad, b.grad = ga, gb
        flat.grad = torch.cat([ga.reshape(-1), gb.reshape(-1)])
        if curvature == "mc" and joint.needs_curvature():
            set_curvature(a, ca)
            set_curvature(b, cb)
            set_curvature(flat, torch.cat([ca.reshape(-1), cb.reshape(-1)]))
        joint.step()
        single.step()
    torch.testing.assert_close(torch.cat([a.detach().reshape(-1), b.detach().reshape(-1)]), flat.detach(),
                               rtol=0, atol=1e-6)
    torch.testing.assert_close(joint.state[a]["s"], single.state[flat]["s"], rtol=1e-9, atol=1e-12)
    assert b not in joint.state


@pytest.mark.parametrize("backend", [None, "torch"])  # "torch": the device path's masked AdamW
def test_adamw_group_matches_torch_adamw(backend):
    gen = torch.Generator().manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 4, generator=gen))
    ref = torch.nn.Parameter(w.detach().clone())
    ours = Ginger([{"params": [w], "algorithm": "adamw"}], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1,
                  backend=backend)
    torch_adamw = torch.optim.AdamW([ref], lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1)
    assert not ours.needs_curvature()  # mc mode, but AdamW groups never read curvature
    for _ in range(10):
        g = torch.randn(w.shape, generator=gen)
        w.grad, ref.grad = g.clone(), g.clone()
        ours.step()
        torch_adamw.step()
    torch.testing.assert_close(w.detach(), ref.detach(), rtol=0, atol=1e-6)
    assert set(ours.state[w]) == {"exp_avg", "exp_avg_sq", "step", "skipped"}


def test_joint_and_algorithm_validation():
    p, q = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="algorithm"):
        Ginger([p], algorithm="sgd")
    with pytest.raises(ValueError, match="joint"):
        Ginger([{"params": [p], "joint": True, "algorithm": "adamw"}])
    with pytest.raises(ValueError, match="one dtype"):
        Ginger([{"params": [p, q], "joint": True}])
    with pytest.raises(ValueError, match="eps"):
        Ginger([p], eps=0.0)
