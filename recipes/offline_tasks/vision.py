"""Image classification: ResNets with a CIFAR stem, the paper's augmentation, and the offline digits task.

Shared by ``recipes/image_classification/run_image_classification.py`` (CIFAR-100, or any image
folder) and ``scripts/compare.py --task vision`` (scikit-learn's bundled 8x8 ``digits``, 1,797
real handwritten digits, so optimizers can be compared offline in minutes).

The official code (MANGA-UOFA/Ginger ``img_cls.py``) trains ResNet-18/50 on 32x32 CIFAR-100 with a
3x3 stride-1 first convolution and no max-pool, random crops of the image padded by 4 pixels
(reflection), horizontal flips and ImageNet mean/std normalisation; transformers' ResNet has the
ImageNet stem (7x7 stride 2 + max-pool), so ``CifarResNetForImageClassification`` swaps it.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetForImageClassification, Trainer, TrainingArguments
from transformers.models.resnet.modeling_resnet import ResNetConvLayer

import ginger_hf  # noqa: F401  (registers optim="ginger")

from .proxy import EvalClock, optimizer_state_mb

# The paper's two networks (transformers' ResNetConfig; hidden_sizes are the stages' output channels).
RESNET_SIZES = {
    "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], embedding_size=64),
    "resnet50": dict(layer_type="bottleneck", depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048],
                     embedding_size=64),
}
# What the official code normalises CIFAR-100 with (ImageNet's statistics, also microsoft/resnet-*'s).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_PADDING = 4  # random crop of the image padded by 4 pixels on each side (32x32 -> 40x40 -> 32x32)


class CifarResNetForImageClassification(ResNetForImageClassification):
    """``ResNetForImageClassification`` with the CIFAR stem: a 3x3 stride-1 first conv and no max-pool.

    On 32x32 images the ImageNet stem would leave 8x8 feature maps after two layers (1x1 after the
    last stage). Same parameter names as the stock model (only the stem conv's kernel is 3x3), so
    ``save_pretrained`` / ``from_pretrained`` round-trip; ``config.cifar_stem`` marks such checkpoints.
    """

    def __init__(self, config: ResNetConfig):
        super().__init__(config)
        config.cifar_stem = True
        stem = ResNetConvLayer(config.num_channels, config.embedding_size, kernel_size=3, stride=1,
                               activation=config.hidden_act)
        stem.apply(self._init_weights)  # the model's own init: kaiming (fan_out) convs, BatchNorm 1 / 0
        self.resnet.embedder.embedder = stem
        self.resnet.embedder.pooler = nn.Identity()


def resnet_config(size: str | dict, num_labels: int, num_channels: int = 3, **overrides) -> ResNetConfig:
    """A ``ResNetConfig`` of a named size (``RESNET_SIZES``) or explicit sizes, marked for the CIFAR stem."""
    sizes = RESNET_SIZES[size] if isinstance(size, str) else size
    return ResNetConfig(num_labels=num_labels, num_channels=num_channels, cifar_stem=True, **{**sizes, **overrides})


def to_tensor(image, channels: int) -> torch.Tensor:
    """A PIL image or ``H x W (x C)`` uint8 array as a float ``C x H x W`` tensor in [0, 1]."""
    if hasattr(image, "convert"):
        image = image.convert("RGB" if channels == 3 else "L")
    array = np.asarray(image, dtype=np.float32) / 255.0
    if array.ndim == 2:
        array = array[:, :, None]
    if array.shape[2] != channels:
        raise ValueError(f"expected images with {channels} channels, got shape {array.shape}")
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def random_crop_flip(image: torch.Tensor, padding: int, flip: bool) -> torch.Tensor:
    """The paper's augmentation of one ``C x H x W`` image: a random crop of the reflection-padded image,
    then (if ``flip``) a horizontal flip with probability 1/2. Draws from torch's global generator."""
    _, h, w = image.shape
    if padding:
        padded = F.pad(image[None], (padding,) * 4, mode="reflect")[0]
        top, left = torch.randint(0, 2 * padding + 1, (2,)).tolist()
        image = padded[:, top:top + h, left:left + w]
    if flip and torch.rand(()) < 0.5:
        image = image.flip(-1)
    return image


def image_transform(*, image_column: str, label_column: str, channels: int, mean, std, train: bool,
                    padding: int = CIFAR_PADDING, flip: bool = True, size: int | None = None):
    """A batch transform for ``datasets.Dataset.with_transform``: images to normalised ``pixel_values``.

    Training batches are augmented (``random_crop_flip``) at the images' own resolution; then, if
    ``size`` is set, resized (bilinear) to ``size x size`` (a pre-trained ImageNet model's input size).
    """
    mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def transform(batch: dict) -> dict:
        pixels = []
        for image in batch[image_column]:
            x = to_tensor(image, channels)
            if train:
                x = random_crop_flip(x, padding, flip)
            if size is not None and x.shape[-2:] != (size, size):
                x = F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False)[0]
            pixels.append((x - mean) / std)
        return {"pixel_values": pixels, "labels": list(batch[label_column])}

    return transform


def accuracy(eval_pred) -> dict[str, float]:
    """``compute_metrics`` for the Trainer: top-1 accuracy of the logits."""
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, axis=-1) == labels).mean())}


def image_trainer(**kwargs) -> Trainer:
    """A ``Trainer`` reporting top-1 accuracy, with the loss of gradient accumulation scaled right.

    ``ResNetForImageClassification.forward`` takes ``**kwargs``, so the Trainer (transformers 5.25) passes
    it ``num_items_in_batch`` and leaves the loss undivided by the accumulation steps, but the model's loss
    is a mean over the micro-batch that ignores the count: gradients would be ``accumulation_steps`` times
    too large. Declaring that the model takes no loss kwargs restores the division (and the curvature
    hook then counts labels itself: every image has one).
    """
    trainer = Trainer(compute_metrics=accuracy, **kwargs)
    trainer.model_accepts_loss_kwargs = False
    return trainer


# -- the offline task: scikit-learn's digits -------------------------------------------------------------

DIGITS_EVAL_SIZE = 500  # held out (a fixed shuffle), the other 1,297 images train
DIGITS_PADDING = 1  # 1 pixel on 8x8 images: the paper's 4 on 32x32, in proportion; no flips (digits are not symmetric)
# A ResNet a laptop trains in seconds: CIFAR stem, three basic stages of one block (16/32/64 channels),
# 8x8 -> 8x8 -> 4x4 -> 2x2, ~78k parameters, every kind of ResNet parameter (conv, BatchNorm, shortcut, head).
DIGITS_RESNET = dict(layer_type="basic", depths=[1, 1, 1], hidden_sizes=[16, 32, 64], embedding_size=16)
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 64
# The paper's optimizers for images (official configs/optimizer/*.yaml; GINGER.md section 5), at each one's
# learning rate for the digits task (its best final accuracy in the sweep of scripts/sweep_vision.py; README).
OPTIMIZERS = {
    "ginger": dict(optim="ginger"),
    "ginger_paper": dict(optim="ginger", optim_args="preset=paper"),
    "adamw": dict(optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.99),
    "sgd": dict(optim="sgd", optim_args="momentum=0.9"),
}
TASK_LR = {"ginger": 3e-4, "ginger_paper": 3e-4, "adamw": 1e-3, "sgd": 0.03}


def load_digits(eval_size: int = DIGITS_EVAL_SIZE):
    """scikit-learn's bundled digits as a ``DatasetDict`` of 8x8 grayscale PIL images (``image``, ``label``).

    Pixel values 0..16 are scaled to 0..255; ``train`` and ``validation`` come from one fixed shuffle.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
    from PIL import Image as PILImage
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    images = [PILImage.fromarray(np.round(digits.images[i] * 255 / 16).astype(np.uint8)) for i in order]
    labels = [int(digits.target[i]) for i in order]
    features = Features({"image": Image(), "label": ClassLabel(names=[str(d) for d in range(10)])})
    split = len(labels) - eval_size
    return DatasetDict({
        "train": Dataset.from_dict({"image": images[:split], "label": labels[:split]}, features=features),
        "validation": Dataset.from_dict({"image": images[split:], "label": labels[split:]}, features=features),
    })


def digits_transforms(data) -> dict:
    """Train (augmented) and eval transforms of the digits, normalised by the training images' mean and std."""
    pixels = np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in data["train"]["image"]])
    stats = dict(image_column="image", label_column="label", channels=1, mean=(float(pixels.mean()),),
                 std=(float(pixels.std()),), padding=DIGITS_PADDING, flip=False)
    return {"train": image_transform(train=True, **stats), "validation": image_transform(train=False, **stats)}


def build_digits_model(seed: int = 0, **overrides) -> CifarResNetForImageClassification:
    torch.manual_seed(seed)
    return CifarResNetForImageClassification(resnet_config({**DIGITS_RESNET, **overrides}, num_labels=10,
                                                           num_channels=1))


class AccuracyClock(EvalClock):
    """``EvalClock`` that also records the eval accuracy at each evaluation."""

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        before = len(self.points)
        super().on_evaluate(args, state, control, metrics=metrics, **kwargs)
        if len(self.points) > before:
            self.points[-1]["eval_accuracy"] = metrics["eval_accuracy"]


def run(optimizer: str, lr: float, *, data, output_dir: str | Path, epochs: int = DEFAULT_EPOCHS,
        batch_size: int = DEFAULT_BATCH_SIZE, seed: int = 0, evals: int = 10, model_overrides: dict | None = None,
        disable_tqdm: bool = True) -> dict:
    """Train the digits ResNet with one optimizer; return its report row (the contract of scripts/compare.py).

    The paper's schedule: linear warmup over the first epoch, then a constant learning rate; batch
    statistics in training, running statistics in evaluation; weight decay 0, no gradient clipping.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    transforms = digits_transforms(data)
    train, valid = (data[s].with_transform(transforms[s]) for s in ("train", "validation"))
    steps_per_epoch = math.ceil(len(train) / batch_size)
    max_steps = epochs * steps_per_epoch
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=256, learning_rate=lr, lr_scheduler_type="constant_with_warmup",
        warmup_steps=steps_per_epoch, weight_decay=0.0, max_grad_norm=0.0, seed=seed, data_seed=seed,
        eval_strategy="steps", eval_steps=max(1, max_steps // evals), eval_on_start=True,
        logging_steps=steps_per_epoch, save_strategy="no", report_to="none", use_cpu=True, dataloader_num_workers=0,
        remove_unused_columns=False, disable_tqdm=disable_tqdm, **OPTIMIZERS[optimizer],
    )
    model = build_digits_model(seed, **(model_overrides or {}))
    clock = AccuracyClock()
    trainer = image_trainer(model=model, args=args, train_dataset=train, eval_dataset=valid, callbacks=[clock])
    start = time.perf_counter()
    trainer.train()
    train_seconds = clock.train_seconds()
    if clock.points[-1]["step"] != max_steps:
        trainer.evaluate()
    return {
        "optimizer": optimizer, "task": "vision", "optim": OPTIMIZERS[optimizer]["optim"],
        "optim_args": OPTIMIZERS[optimizer].get("optim_args", ""), "lr": lr, "seed": seed, "epochs": epochs,
        "max_steps": max_steps, "batch_size": batch_size, "eval_loss": clock.points[-1]["eval_loss"],
        "eval_accuracy": clock.points[-1]["eval_accuracy"], "sec_per_step": train_seconds / max_steps,
        "train_seconds": train_seconds, "wall_seconds": time.perf_counter() - start,
        "optimizer_state_mb": optimizer_state_mb(trainer.optimizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "eval_curve": clock.points,
        "train_loss_curve": [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h],
    }
