"""Summarization pieces shared by the recipe script and the offline main job.

ROUGE is computed with Google's ``rouge_score`` package directly: ``evaluate.load("rouge")``
fetches its metric script from the hub and fails offline (checked with evaluate 0.4.6,
HF_HUB_OFFLINE=1). The numbers are the same as that metric with ``use_aggregator=False``
then averaged: mean F-measure, Porter stemming, rougeLsum with one sentence per line.
"""

from __future__ import annotations

import re

import numpy as np
from rouge_score import rouge_scorer

PREFIX = "summarize: "  # T5's task prefix for summarization
ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def preprocess(examples, tokenizer, *, text_column="document", summary_column="summary",
               max_source_length=512, max_target_length=128, prefix=PREFIX):
    """Batched ``datasets.map`` function: prefix + tokenize sources, tokenize summaries as labels."""
    inputs = [prefix + (doc or "") for doc in examples[text_column]]
    features = tokenizer(inputs, max_length=max_source_length, truncation=True)
    targets = tokenizer(text_target=list(examples[summary_column]), max_length=max_target_length, truncation=True)
    features["labels"] = targets["input_ids"]
    return features


def compute_rouge(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures in percent."""
    if len(predictions) != len(references):
        raise ValueError(f"compute_rouge: {len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    totals = dict.fromkeys(ROUGE_KEYS, 0.0)
    for pred, ref in zip(predictions, references):
        # rougeLsum splits summaries on newlines; put one sentence per line as the HF examples do.
        scores = scorer.score("\n".join(_SENTENCE_END.split(ref.strip())), "\n".join(_SENTENCE_END.split(pred.strip())))
        for key in ROUGE_KEYS:
            totals[key] += scores[key].fmeasure
    n = max(len(predictions), 1)
    return {key: round(100 * total / n, 4) for key, total in totals.items()}


def decode_predictions(tokenizer, predictions, label_ids) -> tuple[list[str], list[str]]:
    """Token ids (with -100 padding from the Trainer) -> stripped prediction and reference strings."""
    predictions = np.where(predictions < 0, tokenizer.pad_token_id, predictions)
    label_ids = np.where(label_ids < 0, tokenizer.pad_token_id, label_ids)
    preds = tokenizer.batch_decode(predictions, skip_special_tokens=True)
    refs = tokenizer.batch_decode(label_ids, skip_special_tokens=True)
    return [p.strip() for p in preds], [r.strip() for r in refs]


def rouge_metric(tokenizer):
    """A ``compute_metrics`` for ``Seq2SeqTrainer(predict_with_generate=True)``."""

    def compute_metrics(eval_pred):
        preds, refs = decode_predictions(tokenizer, eval_pred.predictions, eval_pred.label_ids)
        metrics = compute_rouge(preds, refs)
        generated = np.asarray(eval_pred.predictions)
        metrics["gen_len"] = float(np.mean(np.count_nonzero((generated >= 0) & (generated != tokenizer.pad_token_id), axis=-1)))
        return metrics

    return compute_metrics
