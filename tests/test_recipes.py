"""The summarization recipe: config files, argument parsing, and end-to-end runs on tiny local data."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_script
from safetensors.torch import load_file
from transformers import DataCollatorForSeq2Seq, T5Config, T5ForConditionalGeneration

import ginger_hf
from offline_tasks import proxy

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes" / "summarization" / "run_summarization.py"
CONFIGS = ROOT / "recipes" / "summarization" / "configs"

# GINGER.md section 5, restated here so a drifting config file fails.
GINGER_HP = dict(learning_rate=2e-4, adam_beta1=0.9, beta2=0.99, tau=4, damping=1e-5, rho=1.0)
OPTIMIZERS = ("ginger", "ginger_paper", "adamw", "adafactor")
ADAMW_HP = dict(learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0)
FULL_FT = dict(per_device_train_batch_size=4, num_train_epochs=1, lr_scheduler_type="constant", warmup_steps=0,
               max_grad_norm=1.0, max_source_length=512, max_target_length=128, predict_with_generate=True)
LORA = dict(per_device_train_batch_size=32, num_train_epochs=1, lr_scheduler_type="linear", max_grad_norm=1.0,
            lora_r=8, lora_alpha=32)


def load_recipe():
    spec = importlib.util.spec_from_file_location("run_summarization", RECIPE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve the script's annotations through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def recipe():
    return load_recipe()


def parsed(recipe, name, *extra):
    model_args, data_args, training_args = recipe.parse_args([str(CONFIGS / name), *extra])
    return {**vars(model_args), **vars(data_args), **training_args.to_dict()}


def test_config_files_cover_the_paper_grid():
    names = sorted(p.name for p in CONFIGS.glob("*.yaml"))
    assert names == sorted(f"t5-small_xsum_{s}_{o}.yaml" for s in ("full", "lora") for o in OPTIMIZERS)


@pytest.mark.parametrize("setting", ["full", "lora"])
@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_config_parses_with_paper_hyperparameters(recipe, setting, optimizer):
    args = parsed(recipe, f"t5-small_xsum_{setting}_{optimizer}.yaml")
    assert args["model_name_or_path"] == "google-t5/t5-small"
    assert args["dataset_name"] == "EdinburghNLP/xsum"
    assert args["source_prefix"] == "summarize: "
    for key, value in (FULL_FT if setting == "full" else LORA).items():
        got = args[key].value if hasattr(args[key], "value") else args[key]
        assert got == value, key
    if setting == "full":
        assert args["lora_r"] == 0
    else:
        assert sorted(args["lora_target_modules"]) == ["k", "o", "q", "v"]
        assert args["lora_modules_to_save"] == ["layer_norm"]
    if optimizer == "ginger_paper":
        assert args["optim"] == "ginger" and args["optim_args"] == "preset=paper"
        for key in ("learning_rate", "adam_beta1"):
            assert args[key] == GINGER_HP[key], key
    elif optimizer == "ginger":  # the recommended configuration: only the learning rate is set
        assert args["optim"] == "ginger" and not args["optim_args"]
        assert args["learning_rate"] == ADAMW_HP["learning_rate"]
    elif optimizer == "adamw":
        assert args["optim"].startswith("adamw_torch")
        for key, value in ADAMW_HP.items():
            assert args[key] == value, key
    else:
        assert args["optim"] == "adafactor"


def test_config_flags_after_the_file_override_it(recipe, tmp_path):
    args = parsed(recipe, "t5-small_xsum_full_ginger.yaml", "--learning_rate", "5e-4", "--output_dir", str(tmp_path))
    assert args["learning_rate"] == 5e-4 and args["output_dir"] == str(tmp_path)
    assert args["optim"] == "ginger"


def test_config_with_unknown_key_is_rejected(recipe, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model_name_or_path: x\nlearning_rat: 1e-3\n")
    with pytest.raises(ValueError, match="learning_rat"):
        recipe.parse_args([str(bad)])


@pytest.mark.parametrize("config", ["ginger_paper", "ginger"])
def test_ginger_configs_build_the_paper_and_the_recommended_optimizer(recipe, tmp_path, config):
    """The Trainer turns the paper config into Ginger with exactly GINGER.md's hyper-parameters, and the
    recommended config into the recommended preset."""
    from transformers import Seq2SeqTrainer

    model_args, _, training_args = recipe.parse_args(
        [str(CONFIGS / f"t5-small_xsum_full_{config}.yaml"), "--output_dir", str(tmp_path), "--use_cpu", "true"])
    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    trainer = Seq2SeqTrainer(model=model, args=training_args)
    trainer.create_optimizer()
    opt = ginger_hf.unwrap_ginger(trainer.optimizer)
    assert isinstance(opt, ginger_hf.Ginger)
    preset = ginger_hf.PRESETS["paper" if config == "ginger_paper" else "recommended"]
    for group in opt.param_groups:
        if group.get("algorithm", "ginger") != "ginger":
            continue
        assert group["lr"] == (GINGER_HP["learning_rate"] if config == "ginger_paper" else ADAMW_HP["learning_rate"])
        for key, value in preset.items():
            if key != "curvature_scale":
                assert group[key] == value, key
        assert opt.curvature_scale == preset["curvature_scale"]
    if config == "ginger_paper":
        assert tuple(group["betas"]) == (GINGER_HP["adam_beta1"], GINGER_HP["beta2"])
        assert (group["tau"], group["damping"], group["rho"], group["blocks"]) == (4, 1e-5, 1.0, "tensor")


def write_jsonl_gz(path: Path, rows: list[dict]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


@pytest.fixture(scope="module")
def tiny_local(tmp_path_factory):
    """A tiny T5 saved with save_pretrained (+ the shipped tokenizer) and a few debsum rows as local files."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = proxy.load_tokenizer()
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    raw = proxy.load_debsum(("train", "validation"))
    write_jsonl_gz(root / "train.jsonl.gz", list(raw["train"].select(range(16))))
    write_jsonl_gz(root / "validation.jsonl.gz", list(raw["validation"].select(range(6))))
    write_jsonl_gz(root / "test.jsonl.gz", list(raw["validation"].select(range(6, 12))))
    return root


def run_recipe(recipe, tiny_local, out: Path, *extra: str) -> dict:
    recipe.main([
        "--model_name_or_path", str(tiny_local / "model"),
        "--train_file", str(tiny_local / "train.jsonl.gz"), "--validation_file", str(tiny_local / "validation.jsonl.gz"),
        "--test_file", str(tiny_local / "test.jsonl.gz"), "--output_dir", str(out),
        "--do_train", "--do_eval", "--do_predict", "--predict_with_generate",
        "--max_source_length", "48", "--max_target_length", "12", "--generation_max_length", "8",
        "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "6", "--max_steps", "3",
        "--optim", "ginger", "--optim_args", "tau=2", "--learning_rate", "1e-3",
        "--save_strategy", "no", "--report_to", "none", "--use_cpu", "true", "--disable_tqdm", "true", *extra,
    ])
    return json.loads((out / "all_results.json").read_text())


def assert_rouge_written(out: Path, metrics: dict) -> None:
    for split in ("eval", "predict"):
        for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
            value = metrics[f"{split}_{key}"]
            assert 0.0 <= value <= 100.0
    assert metrics["train_samples"] == 16 and metrics["predict_samples"] == 6
    assert len((out / "generated_predictions.txt").read_text().splitlines()) == 6


def test_recipe_end_to_end_full_finetuning_with_ginger(recipe, tiny_local, tmp_path):
    before = load_file(tiny_local / "model" / "model.safetensors")
    metrics = run_recipe(recipe, tiny_local, tmp_path / "full")
    assert_rouge_written(tmp_path / "full", metrics)
    after = load_file(tmp_path / "full" / "model.safetensors")
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert "encoder.block.0.layer.0.SelfAttention.q.weight" in changed  # Ginger moved the weights


def test_recipe_end_to_end_lora_with_ginger(recipe, tiny_local, tmp_path):
    out = tmp_path / "lora"
    metrics = run_recipe(recipe, tiny_local, out, "--lora_r", "4", "--lora_alpha", "16")
    assert_rouge_written(out, metrics)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 16
    assert sorted(config["target_modules"]) == ["k", "o", "q", "v"]
    adapter = load_file(out / "adapter_model.safetensors")
    # LoRA B starts at zero; after training it is not, and the layer norms (vector parameters) were trained too.
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)
    norms = [v for k, v in adapter.items() if "layer_norm" in k]
    assert norms and any(not torch.allclose(v, torch.ones_like(v)) for v in norms)
    assert not any("DenseReluDense" in k for k in adapter)  # frozen base weights are not saved


def test_bundled_sample_and_tokenizer_load_offline():
    sizes = {p.name: p.stat().st_size for p in proxy.DEBSUM_DIR.glob("*.jsonl.gz")}
    assert set(sizes) == {"train.jsonl.gz", "validation.jsonl.gz", "test.jsonl.gz"}
    assert sum(sizes.values()) < 3_000_000  # "a few MB at most"
    raw = proxy.load_debsum(("train", "validation", "test"))
    assert {k: len(v) for k, v in raw.items()} == {"train": 16000, "validation": 500, "test": 500}
    assert raw["train"].column_names == ["id", "document", "summary"]
    assert not set(raw["train"]["id"]) & set(raw["validation"]["id"])  # sampled from disjoint source splits
    tokenizer = proxy.load_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id, len(tokenizer)) == (0, 1, 2, 4032)
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(32)])
    assert sentinels == list(range(4000, 4032))  # span-corruption sentinels after the 4,000 pieces
    row = raw["validation"][0]
    ids = tokenizer(row["summary"]).input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == " ".join(row["summary"].split())


def test_span_corruption_hides_spans_behind_sentinels():
    """scripts/pretrain_t5.py: ~15% of tokens in spans, each replaced by one sentinel; the target lists them."""
    pretrain = load_script("pretrain_t5")
    rng = np.random.default_rng(0)
    ids = list(range(100, 180))
    sentinels = list(range(4000, 4032))
    inputs, targets = pretrain.corrupt(ids, sentinels, 1, rng)
    assert inputs[-1] == targets[-1] == 1
    used = [t for t in targets if t in sentinels]
    assert used == sentinels[: len(used)] and [t for t in inputs if t in sentinels] == used
    hidden = [t for t in targets[:-1] if t not in sentinels]
    kept = [t for t in inputs[:-1] if t not in sentinels]
    assert sorted(hidden + kept) == ids and len(hidden) == round(0.15 * len(ids))
    # rebuilding the text: each sentinel in the input stands for the span after it in the target
    spans, current = {}, None
    for t in targets[:-1]:
        if t in sentinels:
            current = t
            spans[t] = []
        else:
            spans[current].append(t)
    rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]
    assert rebuilt == ids


def test_shipped_pretrained_t5_loads_and_knows_span_corruption():
    """The finetune/lora tasks' starting point: loads as float32, beats a fresh model on held-out span corruption."""
    pretrain = load_script("pretrain_t5")
    tokenizer = proxy.load_tokenizer()
    model = proxy.load_pretrained()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.config.vocab_size == len(tokenizer)
    data = pretrain.build_dataset(tokenizer, 1, 123, proxy.MAX_SOURCE_LENGTH).select(range(32))
    batch = DataCollatorForSeq2Seq(tokenizer, model=model)([data[i] for i in range(32)])
    with torch.no_grad():
        trained = model(**batch).loss.item()
        fresh = proxy.build_model(tokenizer)(**batch).loss.item()
    assert trained < fresh - 2.0, (trained, fresh)
