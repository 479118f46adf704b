"""The image-classification recipe (configs, end-to-end runs from a local image folder, with and without
accelerate), the paper's augmentation, and scripts/compare.py --task vision on the bundled digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import free_port, load_module, load_script
from PIL import Image
from safetensors.torch import load_file
from transformers import ResNetConfig, ResNetForImageClassification, Trainer

import ginger_hf
from offline_tasks import vision

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "image_classification" / "run_image_classification.py"
CONFIGS = ROOT / "recipes" / "image_classification" / "configs"
OPTIMIZERS = ("ginger", "ginger_paper", "adamw", "sgd")
# The official configs (MANGA-UOFA/Ginger configs/img-cls.yaml and configs/optimizer/*.yaml), restated here.
PAPER = dict(per_device_train_batch_size=128, num_train_epochs=250, weight_decay=0.0, lr_scheduler_type="constant_with_warmup",
             warmup_steps=1 / 250, max_grad_norm=0.0, dataset_name="uoft-cs/cifar100", image_column_name="img",
             label_column_name="fine_label", padding=4, flip=True)
OPTIMIZER_HP = {
    "ginger_paper": dict(optim="ginger", optim_args="preset=paper", learning_rate=2e-4, adam_beta1=0.9),
    "ginger": dict(optim="ginger", optim_args="", learning_rate=1e-3, adam_beta1=0.9),
    "adamw": dict(optim="adamw_torch", learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99),
    "sgd": dict(optim="sgd", optim_args="momentum=0.9", learning_rate=0.1),
}
# Parameter counts of the CIFAR ResNets for 100 classes (3x3 stem, no max-pool), as commonly reported.
PARAMETERS = {"resnet18": 11_220_132, "resnet50": 23_705_252}


@pytest.fixture(scope="module")
def recipe():
    return load_module(RECIPE)


def parsed(recipe, name, *extra):
    model_args, data_args, training_args = recipe.parse_args([str(CONFIGS / name), *extra])
    return {**vars(model_args), **vars(data_args), **training_args.to_dict()}, model_args


def test_config_files_cover_the_paper_grid():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert names == sorted(f"{size}_cifar100_{setting}_{opt}.yaml" for size in PARAMETERS
                           for setting in ("scratch", "finetune") for opt in OPTIMIZERS)


@pytest.mark.parametrize("size", sorted(PARAMETERS))
@pytest.mark.parametrize("setting", ["scratch", "finetune"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_config_parses_with_the_paper_settings(recipe, size, setting, optimizer):
    args, _ = parsed(recipe, f"{size}_cifar100_{setting}_{optimizer}.yaml")
    for key, value in {**PAPER, **OPTIMIZER_HP[optimizer]}.items():
        got = args[key].value if hasattr(args[key], "value") else args[key]
        assert got == value, key
    if setting == "scratch":
        assert args["config_name"] == size and args["model_name_or_path"] is None and args["image_size"] is None
    else:
        assert args["model_name_or_path"] == f"microsoft/{size.replace('resnet', 'resnet-')}"
        assert args["ignore_mismatched_sizes"] and args["image_size"] == 224


@pytest.mark.parametrize("size", sorted(PARAMETERS))
def test_scratch_configs_build_the_papers_resnets(recipe, size):
    _, model_args = parsed(recipe, f"{size}_cifar100_scratch_ginger.yaml")
    model = recipe.load_model(model_args, [str(i) for i in range(100)])
    assert sum(p.numel() for p in model.parameters()) == PARAMETERS[size]
    stem = model.resnet.embedder.embedder.convolution
    assert (stem.in_channels, stem.out_channels, stem.kernel_size, stem.stride) == (3, 64, (3, 3), (1, 1))
    assert isinstance(model.resnet.embedder.pooler, torch.nn.Identity)
    assert model.config.layer_type == ("basic" if size == "resnet18" else "bottleneck")
    with torch.no_grad():
        model.eval()
        assert model(torch.randn(1, 3, 32, 32)).logits.shape == (1, 100)
    # spatial sizes 32 -> 32 -> 16 -> 8 -> 4 before pooling
    assert model.resnet(torch.randn(1, 3, 32, 32), output_hidden_states=True).hidden_states[-1].shape[-1] == 4


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_configs_build_the_papers_optimizers(recipe, tmp_path, optimizer):
    _, _, training_args = recipe.parse_args([str(CONFIGS / f"resnet18_cifar100_scratch_{optimizer}.yaml"),
                                             "--output_dir", str(tmp_path), "--use_cpu", "true",
                                             "--eval_strategy", "no"])
    model = vision.build_digits_model()
    opt = Trainer(model=model, args=training_args).create_optimizer()
    group = opt.param_groups[0]
    if optimizer.startswith("ginger"):
        ginger = ginger_hf.unwrap_ginger(opt)
        preset = ginger_hf.PRESETS["paper" if optimizer == "ginger_paper" else "recommended"]
        for key, value in preset.items():
            assert (ginger.curvature_scale if key == "curvature_scale" else group[key]) == value, key
        assert group["lr"] == OPTIMIZER_HP[optimizer]["learning_rate"]
    elif optimizer == "adamw":
        assert isinstance(opt, torch.optim.AdamW) and group["betas"] == (0.9, 0.99) and group["lr"] == 1e-3
    else:
        assert isinstance(opt, torch.optim.SGD) and group["momentum"] == 0.9 and group["lr"] == 0.1
    assert group["weight_decay"] == 0.0


def test_augmentation_is_a_reflect_padded_crop_and_a_flip():
    image = torch.arange(2 * 6 * 6, dtype=torch.float32).reshape(2, 6, 6)
    padded = torch.nn.functional.pad(image[None], (2,) * 4, mode="reflect")[0]
    windows = {padded[:, i:i + 6, j:j + 6] for i in range(5) for j in range(5)}
    seen_flip = seen_shift = False
    torch.manual_seed(0)
    for _ in range(60):
        out = vision.random_crop_flip(image, padding=2, flip=True)
        assert out.shape == image.shape
        matches = [w for w in windows if torch.equal(out, w) or torch.equal(out, w.flip(-1))]
        assert matches  # a window of the padded image, maybe mirrored
        seen_flip |= not any(torch.equal(out, w) for w in windows)
        seen_shift |= not torch.equal(out, image) and not torch.equal(out, image.flip(-1))
    assert seen_flip and seen_shift
    assert torch.equal(vision.random_crop_flip(image, padding=0, flip=False), image)


def write_image_folder(root: Path, per_class: int, seed: int) -> None:
    """12x12 RGB PNGs of three classes: the bright channel is the class."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, (12, 12, 3))
            pixels[:, :, label] += 150
            Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.png")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", 6, 0)
    write_image_folder(root / "validation", 3, 1)
    config = vision.resnet_config(dict(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8),
                                  num_labels=3)
    config.save_pretrained(root / "tiny_config")
    torch.manual_seed(0)  # an ImageNet-stem ResNet with 5 labels: the fine-tuning starting point
    ResNetForImageClassification(ResNetConfig(layer_type="basic", depths=[1, 1], hidden_sizes=[8, 16], embedding_size=8,
                                              num_labels=5)).save_pretrained(root / "pretrained")
    return root


def recipe_args(image_folder: Path, out: Path, *model: str) -> list[str]:
    return [*model, "--train_dir", str(image_folder / "train"), "--validation_dir", str(image_folder / "validation"),
            "--output_dir", str(out), "--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "6",
            "--optim", "ginger", "--optim_args", "tau=2,curvature_interval=1", "--learning_rate", "1e-2",
            "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true",
            "--dataloader_num_workers", "0"]


def check_results(out: Path, recipe=None) -> dict:
    metrics = json.loads((out / "all_results.json").read_text())
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and np.isfinite(metrics["eval_loss"])
    assert metrics["train_samples"] == 18 and metrics["eval_samples"] == 9
    return metrics


def test_recipe_trains_a_fresh_cifar_stem_resnet_from_an_image_folder(recipe, image_folder, tmp_path):
    out = tmp_path / "scratch"
    recipe.main(recipe_args(image_folder, out, "--config_name", str(image_folder / "tiny_config")))
    check_results(out)
    saved = load_file(out / "model.safetensors")
    assert saved["resnet.embedder.embedder.convolution.weight"].shape == (8, 3, 3, 3)  # the CIFAR stem
    config = json.loads((out / "config.json").read_text())
    assert config["cifar_stem"] and config["id2label"] == {"0": "blue", "1": "green", "2": "red"}
    # the saved checkpoint loads back with its stem and weights (a further fine-tuning run's starting point)
    model_args = recipe.ModelArguments(model_name_or_path=str(out))
    reloaded = recipe.load_model(model_args, ["blue", "green", "red"])
    assert isinstance(reloaded, vision.CifarResNetForImageClassification)
    for name, value in reloaded.state_dict().items():
        if name in saved:
            assert torch.equal(value, saved[name]), name


def test_recipe_fine_tunes_a_pretrained_resnet_with_a_new_head(recipe, image_folder, tmp_path):
    before = load_file(image_folder / "pretrained" / "model.safetensors")
    out = tmp_path / "finetune"
    recipe.main(recipe_args(image_folder, out, "--model_name_or_path", str(image_folder / "pretrained"),
                            "--image_size", "16"))
    check_results(out)
    after = load_file(out / "model.safetensors")
    assert after["classifier.1.weight"].shape == (3, 16)  # 5 labels -> the folder's 3
    stem = "resnet.embedder.embedder.convolution.weight"
    assert after[stem].shape == before[stem].shape == (8, 3, 7, 7) and not torch.equal(after[stem], before[stem])


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_recipe_under_a_launcher(image_folder, tmp_path, launcher):
    """`accelerate launch` (one CPU process: FINDINGS) and torchrun with two gloo processes (DDP: each rank's
    curvature summed over both, BatchNorm on each rank's half batch)."""
    out = tmp_path / launcher
    if launcher == "accelerate":
        cmd = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--cpu", "--num_processes", "1"]
        extra = []
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port())]
        extra = ["--ddp_backend", "gloo", "--per_device_train_batch_size", "3"]
    cmd += [str(RECIPE), *recipe_args(image_folder, out, "--config_name", str(image_folder / "tiny_config")), *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_results(out)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3


def test_compare_vision_writes_report_table_and_plot(tmp_path):
    compare = load_script("compare")
    out = tmp_path / "cmp"
    rows = compare.main(["--task", "vision", "--optimizers", "ginger,sgd", "--epochs", "2", "--tiny",
                         "--output-dir", str(out)])
    assert [r["optimizer"] for r in rows] == ["ginger", "sgd"]
    assert [r["lr"] for r in rows] == [vision.TASK_LR["ginger"], vision.TASK_LR["sgd"]]
    for r in json.loads((out / "report.json").read_text()):
        assert r["max_steps"] == 42 and r["eval_curve"][0]["step"] == 0 and r["eval_curve"][-1]["step"] == 42
        assert 0.0 <= r["eval_accuracy"] <= 1.0 and r["eval_curve"][-1]["eval_accuracy"] == r["eval_accuracy"]
        assert r["eval_curve"][-1]["eval_loss"] < r["eval_curve"][0]["eval_loss"]  # two epochs (one of warmup) already help
    # same seed, same init: the same accuracy before training
    assert rows[0]["eval_curve"][0]["eval_accuracy"] == rows[1]["eval_curve"][0]["eval_accuracy"]
    assert "| optimizer | lr | eval accuracy | eval loss | at equal time |" in (out / "report.md").read_text()
    assert (out / "curves.png").stat().st_size > 10_000


def test_digits_are_the_bundled_images_split_once():
    data = vision.load_digits()
    assert (len(data["train"]), len(data["validation"])) == (1297, 500)
    image = data["train"][0]["image"]
    assert image.size == (8, 8) and image.mode == "L"
    assert sorted(set(data["validation"]["label"])) == list(range(10))
    assert vision.load_digits()["train"]["label"][:20] == data["train"]["label"][:20]  # a fixed shuffle


def test_sweep_picks_each_best_lr_by_loss_and_pairs_seeds():
    """scripts/sweep_vision.py's tables: best lr by mean eval loss (grid edges flagged), paired per-seed differences."""
    sweep = load_script("sweep_vision")
    rows = [dict(optimizer=name, lr=lr, seed=seed, eval_loss=loss + 0.01 * seed, eval_accuracy=acc + 0.001 * seed,
                 sec_per_step=0.1)
            for name, grid in {"ginger": [(1e-3, 0.3, 0.90), (3e-3, 0.1, 0.95), (1e-2, 0.2, 0.97)],
                               "adamw": [(1e-3, 0.4, 0.80), (3e-3, 0.2, 0.85)]}.items()
            for lr, loss, acc in grid for seed in (0, 1, 2)]
    assert sweep.best_lrs(rows) == {"ginger": 3e-3, "adamw": 3e-3}  # ginger: lowest loss, not highest accuracy
    table = sweep.sweep_table(rows)
    assert "ginger: best lr 0.003 inside" in table and "adamw: best lr 0.003 AT THE EDGE OF" in table
    assert "| ginger - adamw | 3 | +0.1000 ± 0.0000 (+0.100, +0.100, +0.100) | -0.1000 ± 0.0000 |" in sweep.paired_table(rows)
