#!/usr/bin/env python
"""Fine-tune a seq2seq model for summarization with the stock Seq2SeqTrainer.

Every ``Seq2SeqTrainingArguments`` flag works, ``--optim ginger`` included (``import
ginger_hf`` registers it). Arguments come from the command line, from a YAML/JSON file
given as the first argument (``configs/`` holds the paper's settings), or both: flags
after the file override it.

    accelerate launch recipes/summarization/run_summarization.py \
        recipes/summarization/configs/t5-small_xsum_full_ginger.yaml --output_dir runs/full_ginger

Data: a hub dataset (``--dataset_name``) or local csv/json/jsonl(.gz) files. Model: a hub
name or local path (``--model_name_or_path``), or a fresh one from a config
(``--config_name``). With ``--lora_r > 0`` the model is wrapped with peft's LoRA.
Writes ``{train,eval,predict,all}_results.json`` (ROUGE-1/2/L/Lsum from ``rouge_score``)
and ``generated_predictions.txt`` to ``--output_dir``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
from transformers import (AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, DataCollatorForSeq2Seq,
                          HfArgumentParser, Seq2SeqTrainer, Seq2SeqTrainingArguments, set_seed)

import ginger_hf  # noqa: F401  (registers --optim ginger)
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # recipes/: the shared offline_tasks helpers
from offline_tasks.config_file import parse_args_with_config_file  # noqa: E402
from offline_tasks.summarization import PREFIX, decode_predictions, preprocess, rouge_metric  # noqa: E402


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "Hub name or local path of a pretrained model."})
    config_name: str | None = field(default=None, metadata={"help": "Config (hub name or path) for a freshly initialised model."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["q", "k", "v", "o"],
                                           metadata={"help": "Modules that get LoRA adapters (T5 attention projections)."})
    lora_modules_to_save: list[str] = field(default_factory=lambda: ["layer_norm"],
                                            metadata={"help": "Modules trained fully next to LoRA (T5's vector parameters "
                                                              "are its layer norms; 'layer_norm' also matches final_layer_norm)."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. EdinburghNLP/xsum."})
    dataset_config_name: str | None = None
    dataset_revision: str | None = field(default=None, metadata={
        "help": "Hub revision; 'refs/convert/parquet' loads the hub's parquet export of a script-based dataset."})
    train_file: str | None = field(default=None, metadata={"help": "Local csv/json/jsonl file (may be .gz)."})
    validation_file: str | None = None
    test_file: str | None = None
    text_column: str = "document"
    summary_column: str = "summary"
    source_prefix: str = field(default=PREFIX, metadata={"help": "Prepended to every source (T5 task prefix)."})
    max_source_length: int = 512
    max_target_length: int = 128
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    preprocessing_num_workers: int | None = None


def parse_args(argv: list[str]):
    """HfArgumentParser over the three dataclasses; a leading .yaml/.json file supplies defaults."""
    return parse_args_with_config_file(HfArgumentParser((ModelArguments, DataArguments, Seq2SeqTrainingArguments)), argv)


def load_raw(data_args: DataArguments) -> datasets.DatasetDict:
    if data_args.dataset_name:
        return datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name,
                                     revision=data_args.dataset_revision)
    files = {s: f for s, f in (("train", data_args.train_file), ("validation", data_args.validation_file),
                                ("test", data_args.test_file)) if f}
    if not files:
        raise ValueError("give --dataset_name or at least one of --train_file/--validation_file/--test_file")
    ext = next(iter(files.values())).removesuffix(".gz").rsplit(".", 1)[-1]
    return datasets.load_dataset("json" if ext in ("json", "jsonl") else ext, data_files=files)


def load_model(model_args: ModelArguments):
    if model_args.model_name_or_path:
        model = AutoModelForSeq2SeqLM.from_pretrained(model_args.model_name_or_path)
    elif model_args.config_name:
        model = AutoModelForSeq2SeqLM.from_config(AutoConfig.from_pretrained(model_args.config_name))
    else:
        raise ValueError("give --model_name_or_path (pretrained) or --config_name (fresh model)")
    if model_args.lora_r > 0:
        from peft import LoraConfig, TaskType, get_peft_model

        model = get_peft_model(model, LoraConfig(
            task_type=TaskType.SEQ_2_SEQ_LM, r=model_args.lora_r, lora_alpha=model_args.lora_alpha,
            lora_dropout=model_args.lora_dropout, target_modules=list(model_args.lora_target_modules),
            modules_to_save=list(model_args.lora_modules_to_save) or None))
        model.print_trainable_parameters()
    return model


def main(argv: list[str] | None = None) -> dict:
    model_args, data_args, training_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
                        level=training_args.get_process_log_level())
    set_seed(training_args.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_args.tokenizer_name or model_args.model_name_or_path
                                              or model_args.config_name)
    model = load_model(model_args)
    if training_args.fsdp:
        # accelerate's FSDP2 shards the input embedding together with lm_head; transformers 5 gives T5's encoder
        # and decoder embedding modules of their own that share its weight (fully_shard would see it twice).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        base.set_input_embeddings(base.get_input_embeddings())  # one module for all its uses
    raw = load_raw(data_args)

    def prepare(split: str, limit: int | None):
        ds = raw[split]
        if limit is not None:
            ds = ds.select(range(min(limit, len(ds))))
        with training_args.main_process_first(desc=f"{split} tokenization"):
            return ds.map(preprocess, batched=True, remove_columns=ds.column_names,
                          num_proc=data_args.preprocessing_num_workers, desc=f"Tokenizing {split}",
                          fn_kwargs=dict(tokenizer=tokenizer, text_column=data_args.text_column,
                                         summary_column=data_args.summary_column, prefix=data_args.source_prefix,
                                         max_source_length=data_args.max_source_length,
                                         max_target_length=data_args.max_target_length))

    splits = {"train": ("--do_train", training_args.do_train, data_args.max_train_samples),
              "validation": ("--do_eval", training_args.do_eval, data_args.max_eval_samples),
              "test": ("--do_predict", training_args.do_predict, data_args.max_predict_samples)}
    data = {}
    for split, (flag, wanted, limit) in splits.items():
        if wanted:
            if split not in raw:
                raise ValueError(f"{flag} needs a '{split}' split; the data has {sorted(raw)}")
            data[split] = prepare(split, limit)

    if training_args.generation_max_length is None:
        training_args.generation_max_length = data_args.max_target_length
    trainer = Seq2SeqTrainer(
        model=model, args=training_args, train_dataset=data.get("train"), eval_dataset=data.get("validation"),
        data_collator=DataCollatorForSeq2Seq(tokenizer, model=model, label_pad_token_id=-100),
        processing_class=tokenizer,
        compute_metrics=rouge_metric(tokenizer) if training_args.predict_with_generate else None,
    )

    results = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        metrics = {**train_result.metrics, "train_samples": len(data["train"])}
        trainer.log_metrics("train", metrics)
        trainer.save_metrics("train", metrics)
        trainer.save_state()
        results.update(metrics)
    if training_args.do_eval:
        metrics = {**trainer.evaluate(metric_key_prefix="eval"), "eval_samples": len(data["validation"])}
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    if training_args.do_predict:
        out = trainer.predict(data["test"], metric_key_prefix="predict")
        metrics = {**out.metrics, "predict_samples": len(data["test"])}
        trainer.log_metrics("predict", metrics)
        trainer.save_metrics("predict", metrics)
        results.update(metrics)
        if training_args.predict_with_generate and trainer.is_world_process_zero():
            preds, _ = decode_predictions(tokenizer, out.predictions, out.label_ids)
            path = os.path.join(training_args.output_dir, "generated_predictions.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(p.replace("\n", " ") for p in preds) + "\n")
    return results


if __name__ == "__main__":
    main()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # gloo aborts at exit when a group is left alive
