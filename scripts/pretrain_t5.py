#!/usr/bin/env python
"""Pre-train the proxy T5 once on span corruption, for the fine-tuning and LoRA tasks.

    python scripts/pretrain_t5.py                       # -> outputs/pretrained_t5/ (about 5 minutes)
    python scripts/pretrain_t5.py --output-dir recipes/offline_tasks/data/pretrained_t5   # refresh the shipped copy
    python scripts/pretrain_t5.py --model large         # -> outputs/pretrained_t5_large/ (the 8.4M T5, not shipped)

T5's own objective (Raffel et al. 2020): 15% of each document's tokens, in spans of mean
length 3, are replaced by sentinels ``<extra_id_i>``; the target lists each sentinel
followed by the tokens it hid. Documents only (never a summary) from the bundled train
sample, so the summarization task stays unseen. The model is ``offline_tasks.proxy``'s T5
(``sane_init_``), trained by AdamW with a fixed seed, one thread, a fixed corruption per
epoch: the run is deterministic on a given machine and torch build. The weights are saved
in bfloat16 (2.9 MB, shipped as ``recipes/offline_tasks/data/pretrained_t5``); the tasks load them as
float32. ``--model large`` pre-trains the 8.4M T5 (``proxy.MODELS``) with the same recipe at lr 1e-3
(AdamW's best for that model from scratch) into ``proxy.PRETRAINED["large"]`` (17 MB: built on first use
by ``scripts/sweep_lr.py --model large --task finetune|lora``, never shipped). ``--max-steps`` stops early
(to time a few steps: the README's estimate of a full run).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import DataCollatorForSeq2Seq, Seq2SeqTrainer, Seq2SeqTrainingArguments, TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # offline_tasks
from offline_tasks import proxy  # noqa: E402

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0


def span_mask(length: int, rng: np.random.Generator) -> np.ndarray:
    """T5's random_spans_noise_mask: alternating kept / noise spans, noise spans of mean length 3."""
    num_noise = max(1, min(length - 1, round(length * NOISE_DENSITY)))
    num_spans = max(1, round(num_noise / MEAN_SPAN))
    num_keep = length - num_noise

    def segments(total: int, parts: int) -> np.ndarray:
        cuts = np.sort(rng.choice(np.arange(1, total), size=parts - 1, replace=False)) if parts > 1 else np.array([], int)
        return np.diff(np.concatenate([[0], cuts, [total]]))

    noise, keep = segments(num_noise, num_spans), segments(num_keep, num_spans)
    mask = np.zeros(length, dtype=bool)
    pos = 0
    for k, n in zip(keep, noise):
        pos += k
        mask[pos:pos + n] = True
        pos += n
    return mask


def corrupt(ids: list[int], sentinels: list[int], eos: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """Inputs with each noise span replaced by one sentinel; targets: sentinel, span, ..., eos."""
    mask = span_mask(len(ids), rng)
    inputs, targets, span = [], [], -1
    for i, (tok, noisy) in enumerate(zip(ids, mask)):
        if noisy:
            if i == 0 or not mask[i - 1]:
                span += 1
                inputs.append(sentinels[span])
                targets.append(sentinels[span])
            targets.append(tok)
        else:
            inputs.append(tok)
    return inputs + [eos], targets + [eos]


def build_dataset(tokenizer, epochs: int, seed: int, max_length: int) -> Dataset:
    sentinels = tokenizer.convert_tokens_to_ids([f"<extra_id_{i}>" for i in range(32)])
    docs = [d or "" for d in proxy.load_debsum(("train",))["train"]["document"]]
    ids = tokenizer(docs, max_length=max_length, truncation=True, add_special_tokens=False)["input_ids"]
    rng = np.random.default_rng(seed)
    rows = {"input_ids": [], "labels": []}
    for _ in range(epochs):
        for doc in ids:
            if len(doc) < 4:
                continue
            x, y = corrupt(doc, sentinels, tokenizer.eos_token_id, rng)
            rows["input_ids"].append(x)
            rows["labels"].append(y)
    return Dataset.from_dict(rows)


class StopAt(TrainerCallback):
    """Ends training after ``steps`` optimizer steps (the schedule stays the full run's)."""

    def __init__(self, steps: int):
        self.steps = steps

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=sorted(proxy.MODELS), default="proxy")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="default outputs/pretrained_t5 (proxy) or proxy.PRETRAINED['large']")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=None, help="default 3e-3 (proxy), 1e-3 (large)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps (timing only)")
    a = p.parse_args(argv)
    a.output_dir = a.output_dir or (Path("outputs/pretrained_t5") if a.model == "proxy" else proxy.PRETRAINED[a.model])
    a.lr = a.lr or (3e-3 if a.model == "proxy" else 1e-3)
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tokenizer = proxy.load_tokenizer()
    train = build_dataset(tokenizer, a.epochs, a.seed, proxy.MAX_SOURCE_LENGTH)
    held_out = build_dataset(tokenizer, 1, a.seed + 1, proxy.MAX_SOURCE_LENGTH).select(range(256))
    model = proxy.build_model(tokenizer, seed=a.seed, **proxy.MODELS[a.model])
    full = len(train) // a.batch_size
    steps = min(full, a.max_steps or full)
    args = Seq2SeqTrainingArguments(
        output_dir=str(a.output_dir / "trainer"), max_steps=full, per_device_train_batch_size=a.batch_size,
        per_device_eval_batch_size=64, learning_rate=a.lr, lr_scheduler_type="linear", warmup_steps=full // 20,
        max_grad_norm=1.0, optim="adamw_torch_fused", adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.0,
        seed=a.seed, data_seed=a.seed, train_sampling_strategy="group_by_length",
        eval_strategy="steps" if steps == full else "no", eval_steps=max(1, full // 4), logging_steps=50, save_strategy="no", report_to="none", use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = Seq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=held_out,
                             data_collator=DataCollatorForSeq2Seq(tokenizer, model=model), processing_class=tokenizer)
    start, cpu_start = time.perf_counter(), time.process_time()
    if steps < full:  # timing only: the same schedule, stopped early, nothing saved
        trainer.add_callback(StopAt(steps))
        trainer.train()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        print(f"{steps} of {full} steps in {seconds:.0f} s ({seconds / steps:.3f} s/step; {cpu / steps:.3f} CPU s/step): "
              f"a full run would take about {seconds / steps * full / 60:.0f} minutes, {cpu / steps * full / 60:.0f} "
              f"on an idle core (evaluation excluded; the first batch is the longest)")
        return
    trainer.train()
    loss = trainer.evaluate()["eval_loss"]
    model.to(torch.bfloat16).save_pretrained(a.output_dir)
    print(f"pre-trained {steps} steps in {time.perf_counter() - start:.0f} s; held-out span-corruption loss "
          f"{loss:.3f}; saved to {a.output_dir}")


if __name__ == "__main__":
    main()
