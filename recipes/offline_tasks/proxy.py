"""The offline proxy task behind scripts/compare.py and scripts/sweep_lr.py.

Importing this module imports ``ginger_hf``, which registers ``optim="ginger"`` with transformers.

A small T5 built from a config (no hub), trained from scratch on the bundled
debsum sample (Debian package descriptions -> one-line synopses) with the stock
``Seq2SeqTrainer``, so optimizers can be compared on a laptop in minutes.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoTokenizer, DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments,
                          T5Config, T5ForConditionalGeneration, TrainerCallback)

from . import peers
from .summarization import decode_predictions, compute_rouge, preprocess

DATA_DIR = Path(__file__).resolve().parent / "data"
DEBSUM_DIR = DATA_DIR / "debsum"
TOKENIZER_DIR = DATA_DIR / "tokenizer"
PRETRAINED_DIR = DATA_DIR / "pretrained_t5"  # made by scripts/pretrain_t5.py (span corruption, bfloat16)

# The three tasks of scripts/compare.py: a fresh model, or the pre-trained one fine-tuned fully or with LoRA
# (rank 8, alpha 32 on the attention projections, layer norms trained: the paper's LoRA recipe).
TASKS = ("scratch", "finetune", "lora")
LORA = dict(r=8, lora_alpha=32, lora_dropout=0.0, target_modules=["q", "k", "v", "o"], modules_to_save=["layer_norm"])

# 2+2 layers, d_model 128: ~1.4M parameters. Much smaller than FINDINGS' 8.4M proxy so that
# two optimizers (Ginger's step costs two backward passes) fit 15 minutes on 2 shared CPU cores.
PROXY_CONFIG = dict(d_model=128, d_kv=32, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4,
                    dropout_rate=0.0)
# T5Config overrides of each model size: the proxy, and FINDINGS' 8.4M-parameter T5 (4+4 layers, d_model 256).
MODELS = {"proxy": {}, "large": dict(d_model=256, d_kv=64, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4)}
# The pre-trained T5 of each size for finetune and lora: the proxy's is shipped (2.9 MB); the large one (17 MB in
# bfloat16) is built on first use by `scripts/pretrain_t5.py --model large` and cached under outputs/.
PRETRAINED = {"proxy": PRETRAINED_DIR,
              "large": Path(__file__).resolve().parents[2] / "outputs" / "pretrained_t5_large"}
MAX_SOURCE_LENGTH = 128  # keeps ~80% of debsum documents whole (FINDINGS)
MAX_TARGET_LENGTH = 32   # every debsum summary fits

# The offline default (scripts/compare.py with no arguments), sized to finish in well under
# 15 minutes on a 2-core CPU for two optimizers.
DEFAULT_MAX_STEPS = 300
DEFAULT_BATCH_SIZE = 32
DEFAULT_EVAL_SIZE = 128  # validation rows for the eval loss
DEFAULT_ROUGE_SIZE = 100  # validation rows generated for ROUGE
# Each optimizer's learning rate per task: its best final eval loss in the sweeps of scripts/sweep_lr.py
# (the full task, at least 3 lrs, the best inside the grid; tables in README "Results").
TASK_LR = {
    "scratch": {"ginger": 1e-3, "ginger_paper": 1e-3, "adamw": 3e-3, "adafactor": 3e-3},
    "finetune": {"ginger": 3e-3, "ginger_paper": 1e-3, "adamw": 3e-3, "adafactor": 3e-3},
    "lora": {"ginger": 3e-3, "ginger_paper": 1e-3, "adamw": 3e-3, "adafactor": 1e-2},
}
DEFAULT_LR = TASK_LR["scratch"]  # the main job's task

# TrainingArguments for each optimizer name the main job accepts. "ginger" is what --optim ginger does
# with nothing else set (the recommended configuration); "ginger_paper" the paper's (GINGER.md section 5).
# AdamW uses the paper baseline's betas (0.9, 0.99); Adafactor (transformers' T5 setting: no relative
# step) ignores them. The peers (issue 20; the ``bench`` extra): AdamW at other beta2, schedule-free AdamW
# (the Trainer's, at a constant lr: it warms up itself over the run's warmup steps and needs no decay), and
# ``peer=NAME`` for optimizers the Trainer does not name, built by ``peers.build`` for the model.
_ADAMW = dict(optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0)
OPTIMIZERS = {
    "ginger": dict(optim="ginger"),
    "ginger_paper": dict(optim="ginger", optim_args="preset=paper"),
    "adamw": _ADAMW,
    "adafactor": dict(optim="adafactor"),
    "adamw_b2_0.95": {**_ADAMW, "adam_beta2": 0.95},
    "adamw_b2_0.999": {**_ADAMW, "adam_beta2": 0.999},
    "schedule_free_adamw": dict(optim="schedule_free_adamw", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
                                lr_scheduler_type="constant"),
    "muon": dict(peer="muon"),
    "soap": dict(peer="soap"),
    "adam_mini": dict(peer="adam_mini"),
}


def load_tokenizer(path: str | Path = TOKENIZER_DIR):
    return AutoTokenizer.from_pretrained(str(path))


def load_debsum(splits=("train", "validation")):
    """The bundled sample as a ``DatasetDict`` (local gzipped JSONL; works offline)."""
    from datasets import load_dataset

    return load_dataset("json", data_files={s: str(DEBSUM_DIR / f"{s}.jsonl.gz") for s in splits})


def sane_init_(model: T5ForConditionalGeneration) -> T5ForConditionalGeneration:
    """Give a from-scratch T5 weights that first-order and Ginger steps can move evenly.

    T5's stock init assumes Adafactor's relative step sizes: the shared embedding (which is
    also the output layer) has std 1 while the linear layers have std 1/sqrt(fan_in) and
    query weights ~0.01 (FINDINGS.md), so an Adam-style step of fixed size barely moves
    the one and swamps the other, and training stalls at word-frequency level. Here every
    linear layer is drawn with std 1/sqrt(fan_in) (the query keeps its extra 1/sqrt(d_kv):
    T5 folds the attention-logit scaling into it, so attention logits keep their stock
    scale), and the shared embedding gets std 1/sqrt(d_model) with the output rescaling
    turned off (config ``tie_word_embeddings=False``: transformers 5 still ties the
    embeddings and only drops the d_model**-0.5 output factor), so output logits also keep
    their stock scale at step 0.
    """
    cfg = model.config
    if cfg.scale_decoder_outputs:
        raise ValueError("sane_init_: build the model with tie_word_embeddings=False (see the docstring)")
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module.weight is not model.shared.weight:
                std = module.in_features ** -0.5
                if name.endswith(".q"):
                    std *= cfg.d_kv ** -0.5
                module.weight.normal_(0.0, std)
        model.shared.weight.normal_(0.0, cfg.d_model ** -0.5)
    return model


def build_model(tokenizer, seed: int = 0, **overrides) -> T5ForConditionalGeneration:
    """A fresh T5 for the tokenizer's vocabulary with ``sane_init_``; ``overrides`` go to ``T5Config``."""
    config = T5Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                      eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=False, **{**PROXY_CONFIG, **overrides})
    torch.manual_seed(seed)
    return sane_init_(T5ForConditionalGeneration(config))


def load_pretrained(path: str | Path = PRETRAINED_DIR) -> T5ForConditionalGeneration:
    """The span-corruption pre-trained proxy T5 (``scripts/pretrain_t5.py``), in float32."""
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no pre-trained T5 at {path}: run `python scripts/pretrain_t5.py --output-dir {path}`")
    return T5ForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)


def build_task_model(task: str, tokenizer, seed: int = 0, model_overrides: dict | None = None,
                     pretrained: str | Path = PRETRAINED_DIR):
    """The model a task trains: fresh (``scratch``), pre-trained (``finetune``) or pre-trained + LoRA (``lora``)."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if task == "scratch":
        return build_model(tokenizer, seed=seed, **(model_overrides or {}))
    model = load_pretrained(pretrained)
    if task == "lora":
        from peft import LoraConfig, TaskType, get_peft_model

        torch.manual_seed(seed)
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_2_SEQ_LM, **LORA))
    return model


def tokenize_splits(raw, tokenizer, sizes: dict[str, int]):
    """First ``sizes[split]`` rows of each split, tokenized for the Trainer."""
    out = {}
    for split, n in sizes.items():
        ds = raw[split]
        if n > len(ds):
            raise ValueError(f"{split} size {n} exceeds the {len(ds)} rows bundled")
        ds = ds.select(range(n))
        out[split] = ds.map(preprocess, batched=True, remove_columns=ds.column_names,
                            fn_kwargs=dict(tokenizer=tokenizer, max_source_length=MAX_SOURCE_LENGTH,
                                           max_target_length=MAX_TARGET_LENGTH))
    return out


class EvalClock(TrainerCallback):
    """Records (step, training seconds, eval loss) at each evaluation; training seconds exclude eval time."""

    def __init__(self):
        self.points, self._start, self._eval_seconds = [], None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self._start is None or not metrics or "eval_loss" not in metrics:
            return
        self._eval_seconds += metrics.get("eval_runtime", 0.0)
        self.points.append({"step": state.global_step, "train_seconds": round(self.train_seconds(), 3),
                            "eval_loss": metrics["eval_loss"]})

    def train_seconds(self) -> float:
        return time.perf_counter() - self._start - self._eval_seconds


def optimizer_state_mb(optimizer) -> float:
    """Megabytes (1e6 bytes) held in the optimizer's state tensors, nested containers included (heavyball nests)."""

    def nbytes(value) -> int:
        if isinstance(value, torch.Tensor):
            return value.numel() * value.element_size()
        if isinstance(value, dict):
            return sum(nbytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(nbytes(v) for v in value)
        return 0

    return sum(nbytes(state) for state in optimizer.state.values()) / 1e6


def run(optimizer: str, lr: float, *, max_steps: int, output_dir: str | Path, data, tokenizer, task: str = "scratch",
        batch_size: int = DEFAULT_BATCH_SIZE, eval_steps: int | None = None, rouge_size: int = DEFAULT_ROUGE_SIZE,
        seed: int = 0, warmup_ratio: float = 0.05, model_overrides: dict | None = None,
        disable_tqdm: bool = False, optim_args: str | None = None, pretrained: str | Path = PRETRAINED_DIR,
        callbacks: list[TrainerCallback] = ()) -> dict:
    """Train the task's model with one optimizer; return its report row (see scripts/compare.py).

    ``optim_args`` replaces the optimizer's ``optim_args`` (Ginger variants in sweeps); ``callbacks`` join the
    Trainer's (scripts/explore_variants.py sets its step on the optimizer from one).
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZERS)}, got {optimizer!r}")
    model = build_task_model(task, tokenizer, seed=seed, model_overrides=model_overrides, pretrained=pretrained)
    optimizer_args = dict(OPTIMIZERS[optimizer])
    if optim_args is not None:
        optimizer_args["optim_args"] = optim_args
    peer = optimizer_args.pop("peer", None)
    optimizer_args = {"lr_scheduler_type": "linear", **optimizer_args}
    eval_steps = eval_steps or max(1, max_steps // 10)
    args = Seq2SeqTrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        per_device_eval_batch_size=2 * batch_size, learning_rate=lr,
        warmup_steps=math.ceil(warmup_ratio * max_steps), max_grad_norm=1.0, seed=seed, data_seed=seed,
        train_sampling_strategy="group_by_length", eval_strategy="steps", eval_steps=eval_steps, eval_on_start=True,
        logging_steps=max(1, min(10, max_steps // 10)), save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=disable_tqdm, generation_max_length=MAX_TARGET_LENGTH,
        generation_num_beams=1, **optimizer_args,
    )
    clock = EvalClock()
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer,
                             callbacks=[clock, *callbacks],
                             optimizers=(None if peer is None else peers.build(peer, model, lr), None))
    trainer.train()
    train_seconds = clock.train_seconds()
    if not clock.points or clock.points[-1]["step"] != max_steps:
        trainer.evaluate()
    # ROUGE: greedy generation on the first `rouge_size` validation examples; no_repeat_ngram_size=3 (as
    # in BART's summarization setting) stops a barely trained model from repeating one token to the limit.
    subset = data["validation"].select(range(min(rouge_size, len(data["validation"]))))
    preds, refs = [], []
    if len(subset):
        trainer.args.predict_with_generate = True  # only now: evaluations during training stay loss-only
        pred = trainer.predict(subset, metric_key_prefix="gen", no_repeat_ngram_size=3)
        preds, refs = decode_predictions(tokenizer, pred.predictions, pred.label_ids)
    losses = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    return {
        "optimizer": optimizer, "task": task, "optim_args": args.optim_args, "optim": peer or (args.optim if isinstance(args.optim, str) else args.optim.value), "lr": lr,
        "max_steps": max_steps, "batch_size": batch_size, "eval_loss": clock.points[-1]["eval_loss"],
        **compute_rouge(preds, refs), "rouge_examples": len(subset),
        "sec_per_step": train_seconds / max_steps, "train_seconds": train_seconds,
        "optimizer_state_mb": optimizer_state_mb(trainer.optimizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "eval_curve": clock.points, "train_loss_curve": losses,
        "ginger_stats": [{k: v for k, v in h.items() if k == "step" or k.startswith("ginger/")}
                         for h in trainer.state.log_history if any(k.startswith("ginger/") for k in h)],
        "samples": [{"prediction": p, "reference": r} for p, r in list(zip(preds, refs))[:3]],
    }
