#!/usr/bin/env python
"""Train a ResNet image classifier (CIFAR-100, or any image folder) with the stock Trainer.

Every ``TrainingArguments`` flag works, ``--optim ginger`` included (``import ginger_hf``
registers it). Arguments come from the command line, from a YAML/JSON file given as the first
argument (``configs/`` holds the paper's settings), or both: flags after the file override it.

    accelerate launch recipes/image_classification/run_image_classification.py \
        recipes/image_classification/configs/resnet18_cifar100_scratch_ginger.yaml --output_dir runs/r18_ginger

Data: a hub dataset (``--dataset_name uoft-cs/cifar100`` with ``--image_column_name img
--label_column_name fine_label``) or local folders of class sub-folders (``--train_dir``,
``--validation_dir``: the ``imagefolder`` layout, ``train_dir/<class>/<image>``). Training
images get the paper's augmentation (random crop of the image padded by ``--padding`` pixels,
horizontal flip), all images ImageNet normalisation and, with ``--image_size``, a bilinear resize
(for models pre-trained at 224x224). Model: a fresh ResNet (``--config_name resnet18`` or
``resnet50``: the paper's sizes with the CIFAR stem; or a ``ResNetConfig`` path / hub name) or a
pre-trained one (``--model_name_or_path microsoft/resnet-18``: a new classifier head for the
dataset's labels). Writes ``{train,eval,all}_results.json`` (loss and top-1 accuracy).
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import AutoConfig, AutoModelForImageClassification, HfArgumentParser, TrainingArguments, set_seed

import ginger_hf  # noqa: F401  (registers --optim ginger)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/: the shared offline_tasks helpers
from offline_tasks.config_file import parse_args_with_config_file  # noqa: E402
from offline_tasks.vision import (CIFAR_PADDING, IMAGENET_MEAN, IMAGENET_STD, RESNET_SIZES,  # noqa: E402
                                  CifarResNetForImageClassification, image_trainer, image_transform, resnet_config)


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={
        "help": "Pre-trained model (hub name or local path), e.g. microsoft/resnet-18. A checkpoint this recipe "
                "saved from a CIFAR-stem model loads with its stem."})
    config_name: str | None = field(default=None, metadata={
        "help": f"A fresh model: one of {sorted(RESNET_SIZES)} (the paper's sizes, CIFAR stem), or a ResNetConfig "
                "path / hub name (CIFAR stem if its config has cifar_stem: true)."})
    ignore_mismatched_sizes: bool = field(default=True, metadata={
        "help": "Give a pre-trained model a new classifier head when the label count differs (ImageNet's 1,000)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. uoft-cs/cifar100."})
    dataset_config_name: str | None = None
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder: train_dir/<class>/<image>."})
    validation_dir: str | None = field(default=None, metadata={"help": "Local image folder for evaluation."})
    eval_split: str | None = field(default=None, metadata={
        "help": "Split to evaluate on; default 'validation' if the data has one, else 'test' (CIFAR-100's)."})
    image_column_name: str = "image"
    label_column_name: str = "label"
    image_size: int | None = field(default=None, metadata={
        "help": "Resize (bilinear, after augmentation) to this square size; default: keep the images' size."})
    padding: int = field(default=CIFAR_PADDING, metadata={"help": "Random-crop padding in pixels (0: no crop)."})
    flip: bool = field(default=True, metadata={"help": "Random horizontal flips of training images."})
    image_mean: list[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(IMAGENET_STD))
    max_train_samples: int | None = None
    max_eval_samples: int | None = None


def parse_args(argv: list[str]):
    """HfArgumentParser over the three dataclasses; a leading .yaml/.json file supplies defaults."""
    return parse_args_with_config_file(HfArgumentParser((ModelArguments, DataArguments, TrainingArguments)), argv)


def load_raw(data_args: DataArguments) -> datasets.DatasetDict:
    if data_args.dataset_name:
        return datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name)
    dirs = {s: d for s, d in (("train", data_args.train_dir), ("validation", data_args.validation_dir)) if d}
    if not dirs:
        raise ValueError("give --dataset_name or at least one of --train_dir/--validation_dir")
    return datasets.load_dataset("imagefolder", data_files={s: os.path.join(d, "**") for s, d in dirs.items()})


def load_model(model_args: ModelArguments, labels: list[str]):
    """A fresh or pre-trained ResNet classifier for ``labels``."""
    label_kwargs = dict(num_labels=len(labels), id2label=dict(enumerate(labels)),
                        label2id={name: i for i, name in enumerate(labels)})
    if model_args.model_name_or_path:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path)
        cls = CifarResNetForImageClassification if getattr(config, "cifar_stem", False) else AutoModelForImageClassification
        return cls.from_pretrained(model_args.model_name_or_path, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
                                   **label_kwargs)
    if not model_args.config_name:
        raise ValueError("give --model_name_or_path (pre-trained) or --config_name (fresh model)")
    if model_args.config_name in RESNET_SIZES:
        config = resnet_config(model_args.config_name, **label_kwargs)
    else:
        config = AutoConfig.from_pretrained(model_args.config_name, **label_kwargs)
    if getattr(config, "cifar_stem", False):
        return CifarResNetForImageClassification(config)
    return AutoModelForImageClassification.from_config(config)


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        level=training_args.get_process_log_level())
    training_args.remove_unused_columns = False  # the transforms below read the raw image column
    set_seed(training_args.seed)

    raw = load_raw(data_args)
    splits = {"train": training_args.do_train, data_args.eval_split or ("validation" if "validation" in raw else "test"):
              training_args.do_eval}
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in next(iter(raw.values())).column_names:
            raise ValueError(f"no column {column!r} in the data (columns: {next(iter(raw.values())).column_names}); "
                             "set --image_column_name / --label_column_name")
    labels = next(iter(raw.values())).features[data_args.label_column_name].names
    model = load_model(model_args, labels)

    data = {}
    for split, wanted in splits.items():
        if not wanted:
            continue
        if split not in raw:
            raise ValueError(f"split '{split}' is needed but the data has {sorted(raw)}")
        ds = raw[split]
        limit = data_args.max_train_samples if split == "train" else data_args.max_eval_samples
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        data[split] = ds.with_transform(image_transform(
            image_column=data_args.image_column_name, label_column=data_args.label_column_name,
            channels=model.config.num_channels, mean=data_args.image_mean, std=data_args.image_std,
            train=split == "train", padding=data_args.padding, flip=data_args.flip, size=data_args.image_size))
    eval_data = next((ds for split, ds in data.items() if split != "train"), None)

    trainer = image_trainer(model=model, args=training_args, train_dataset=data.get("train"), eval_dataset=eval_data)
    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        results.update({**train_result.metrics, "train_samples": len(data["train"])})
        trainer.log_metrics("train", results)
        trainer.save_metrics("train", results)
        trainer.save_state()
    if training_args.do_eval:
        metrics = {**trainer.evaluate(metric_key_prefix="eval"), "eval_samples": len(eval_data)}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo aborts at exit when a group is left alive
