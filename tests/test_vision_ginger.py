"""Ginger on ResNets: conv weights block by output channel, BatchNorm and head as documented, and the
sampled-label curvature through an image classifier equals an independent computation (README "Ginger on
convolutions and BatchNorm")."""

from __future__ import annotations

import pytest
import torch
from dense_reference import DenseGinger
from helpers import COMMON_ARGS, relative_error
from test_trainer import run_and_check_curvature
from transformers import HfArgumentParser, Trainer, TrainingArguments

from ginger_hf import Ginger, unwrap_ginger
from offline_tasks import vision

TINY = dict(layer_type="basic", depths=[1, 1], hidden_sizes=[4, 8], embedding_size=4)


def tiny_resnet(seed: int = 0, num_labels: int = 3) -> vision.CifarResNetForImageClassification:
    torch.manual_seed(seed)
    return vision.CifarResNetForImageClassification(vision.resnet_config(TINY, num_labels=num_labels, num_channels=1))


def image_data(n: int = 32, num_labels: int = 3, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """8x8 one-channel images whose label is the quadrant holding a bright square."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        label = int(torch.randint(0, num_labels, (), generator=g))
        x = 0.3 * torch.randn(1, 8, 8, generator=g)
        x[:, 4 * (label // 2):4 * (label // 2) + 4, 4 * (label % 2):4 * (label % 2) + 4] += 1.0
        rows.append({"pixel_values": x, "labels": torch.tensor(label)})
    return rows


def kinds(model) -> dict[str, str]:
    """Each parameter's kind: conv weight, BatchNorm weight / bias, head weight / bias."""
    out = {}
    for module_name, module in model.named_modules():
        for name, _ in module.named_parameters(recurse=False):
            kind = {torch.nn.Conv2d: "conv", torch.nn.BatchNorm2d: "batchnorm", torch.nn.Linear: "head"}[type(module)]
            out[f"{module_name}.{name}"] = f"{kind} {name}"
    return out


def test_resnet_has_every_parameter_kind_and_the_cifar_stem():
    model = tiny_resnet()
    assert set(kinds(model).values()) == {"conv weight", "batchnorm weight", "batchnorm bias", "head weight", "head bias"}
    stem = model.resnet.embedder.embedder.convolution
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1)
    assert isinstance(model.resnet.embedder.pooler, torch.nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).logits.shape == (2, 3)


def test_conv_weight_blocks_are_output_channels_as_linear_rows():
    """Ginger (recommended preset: row blocks) steps a ResNet exactly as the dense reference that treats each
    conv weight [out, in, kh, kw] as the matrix [out, in*kh*kw] (one block per output channel: its filter),
    each BatchNorm weight and bias as one block of its channels, and the head's weight by rows; past tau
    steps, so the rank truncation is exercised."""
    model = tiny_resnet().double()
    params = list(model.parameters())
    tau, steps = 2, 7
    opt = Ginger(params, lr=0.05, tau=tau, curvature_interval=1)
    hp = {k: opt.param_groups[0][k] for k in ("lr", "betas", "tau", "damping", "rho", "weight_decay", "blocks",
                                             "power", "relative_damping", "bias_correction")}
    assert hp["blocks"] == "row"
    as_matrices = [(p.shape[0], p[0].numel()) if p.dim() >= 2 else tuple(p.shape) for p in params]
    dense = DenseGinger(as_matrices, **hp)
    thetas = [p.detach().reshape(-1).clone() for p in params]
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        curvs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g, c in zip(params, grads, curvs):
            p.grad, p.curvature = g, c
        opt.step()
        thetas = dense.step(thetas, grads, curvs)
    for p, theta in zip(params, thetas):
        assert relative_error(p.detach(), theta) < 1e-9, p.shape
    names = dict(model.named_parameters())
    for name, kind in kinds(model).items():
        p, state = names[name], opt.state[names[name]]
        blocks, length = (p.shape[0], p[0].numel()) if kind in ("conv weight", "head weight") else (1, p.numel())
        assert state["s"].shape == (blocks, min(tau, length)), name
        assert state["U"].shape == (min(tau, length), *p.shape), name


def parse(tmp_path, *argv) -> TrainingArguments:
    (args,) = HfArgumentParser(TrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), *COMMON_ARGS, *argv])
    return args


def test_trainer_steps_batchnorm_and_head_with_ginger_and_counts_each_micro_batch_once(tmp_path):
    """--optim ginger: BatchNorm weights and biases and the head are Ginger blocks like any parameter; the running
    statistics are buffers the optimizer never holds, and the curvature pass shares the training forward, so they
    are updated once per micro-batch (a second forward for the curvature would count every batch twice)."""
    model = tiny_resnet()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    steps, accumulation = 3, 2
    args = parse(tmp_path, "--optim", "ginger", "--optim_args", "curvature_interval=1", "--max_steps", str(steps),
                 "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", str(accumulation),
                 "--learning_rate", "1e-2")
    trainer = Trainer(model=model, args=args, train_dataset=image_data())
    trainer.train()
    ginger = unwrap_ginger(trainer.optimizer)
    held = {id(p) for p in ginger.state}
    for group in ginger.param_groups:
        assert group["algorithm"] == "ginger" and group["blocks"] == "row"
    for name, kind in kinds(model).items():
        p = dict(model.named_parameters())[name]
        assert id(p) in held and ginger.state[p]["step"] == steps, name
        assert not torch.equal(p.detach(), before[name]), name  # every kind moved
    buffers = {id(b) for b in model.buffers()}
    assert not held & buffers
    norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert norms and all(int(m.num_batches_tracked) == steps * accumulation for m in norms)


@pytest.mark.parametrize("make_trainer", [Trainer, vision.image_trainer])
@pytest.mark.parametrize("optim_args,scale", [("curvature_interval=1", "mean"),
                                              ("curvature_interval=1,curvature_scale=sqrt", "sqrt")])
def test_trainer_curvature_matches_independent_computation_image_classifier(tmp_path, monkeypatch, optim_args, scale,
                                                                            make_trainer):
    """The Trainer hook's sampled-label vectors through ResNetForImageClassification's logits (one label per
    image, BatchNorm on the batch's statistics as in the training forward) equal a direct computation, with
    N from the Trainer's num_items_in_batch (stock Trainer) or counted by the hook (the recipe's Trainer)."""
    _, used = run_and_check_curvature(tmp_path, monkeypatch, tiny_resnet, image_data(), make_trainer, False,
                                      optim_args=optim_args)
    assert used == scale


def test_recipe_trainer_averages_micro_batches_under_gradient_accumulation(tmp_path):
    """transformers 5.25 adds up ResNet's micro-batch mean losses under gradient accumulation (the model takes
    **kwargs but its loss ignores num_items_in_batch); the recipe's Trainer averages them, as one batch would."""
    def first_loss(make_trainer, batch, accumulation):
        args = parse(tmp_path, "--optim", "sgd", "--learning_rate", "0", "--max_steps", "1", "--logging_steps", "1",
                     "--per_device_train_batch_size", str(batch), "--gradient_accumulation_steps", str(accumulation))
        trainer = make_trainer(model=tiny_resnet(), args=args, train_dataset=image_data(8))
        trainer.train()
        return trainer.state.log_history[0]["loss"]

    whole = first_loss(vision.image_trainer, 8, 1)
    assert first_loss(vision.image_trainer, 4, 2) == pytest.approx(whole, rel=0.05)  # BatchNorm: not exact
    assert first_loss(Trainer, 4, 2) == pytest.approx(2 * whole, rel=0.05)  # the stock Trainer's double count


def test_image_classifier_with_one_label_is_refused_for_mc(tmp_path):
    """transformers trains a one-label image classifier as a regression (MSE): no softmax to sample from."""
    args = parse(tmp_path, "--optim", "ginger", "--max_steps", "1")
    trainer = Trainer(model=tiny_resnet(num_labels=1), args=args, train_dataset=image_data())
    with pytest.raises(ValueError, match="curvature=empirical"):
        trainer.create_optimizer()
