"""The sampled-label curvature hook that ``--optim ginger`` installs on the Trainer's model.

A forward hook adds each training micro-batch's sampled-label curvature vector
(``ginger_hf.curvature``) at the end of the forward pass, before the Trainer's backward:
the forward pass is shared, and one extra ``autograd.grad`` runs on refresh steps only.

That extra ``autograd.grad`` is why two setups are refused here: ``torch.nn.DataParallel``
replicas (the hook would run in several threads at once, adding to the same vectors) and
reentrant activation checkpointing (which cannot take ``.grad()``; the non-reentrant kind,
transformers' default, can, and gives the same vectors).

Under FSDP2 the hook passes the model on, so the vector is taken with respect to FSDP2's
unsharded parameters and reduce-scattered (``ginger_hf.sharded_curvature``); it must run after
FSDP2's post-forward hook (``reattach_after_fsdp``, which ``GingerAmpCallback`` calls).
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import nn

from . import sharded_curvature
from .comm import world_size
from .curvature import add_sampled_label_curvature
from .distributed import DATA_PARALLEL, global_label_count
from .optimizer import Ginger

__all__ = ["SampledLabelCurvatureHook", "attach_curvature_hook", "reattach_after_fsdp", "check_loss_kind"]


def _not_softmax_ce(what: str) -> ValueError:
    return ValueError(
        f"Ginger curvature='mc' samples labels from softmax(logits), so it needs a softmax cross-entropy model; {what}. "
        "Use --optim_args curvature=empirical for this model."
    )


REENTRANT_CHECKPOINTING = (
    "Ginger curvature='mc' takes a second gradient of each forward pass with torch.autograd.grad, which "
    "reentrant activation checkpointing (use_reentrant=True) does not support. Use the non-reentrant kind: "
    "TrainingArguments(gradient_checkpointing_kwargs={\"use_reentrant\": False}) (or on the command line "
    "--gradient_checkpointing_kwargs '{\"use_reentrant\": false}'; transformers' default when the kwargs are "
    "omitted), or --optim_args curvature=empirical."
)


def _base_model(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _loss_shifts_labels(model: nn.Module) -> bool:
    """Whether the model's loss predicts label i+1 at position i: decoder-only causal LMs.

    Either rule transformers uses: a causal-LM loss type (``Trainer._loss_shifts_labels``) or a
    class registered as a causal LM (``Trainer.compute_loss``'s label-smoothing path; catches
    ``GPT2LMHeadModel``, whose ``loss_type`` is ``None``).
    """
    from transformers.loss.loss_utils import LOSS_MAPPING, ForCausalLMLoss
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    base = _base_model(model)
    if getattr(getattr(base, "config", None), "is_encoder_decoder", False):
        return False
    return (
        LOSS_MAPPING.get(getattr(base, "loss_type", None)) is ForCausalLMLoss
        or type(base).__name__ in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values()
    )


def check_loss_kind(model: nn.Module) -> None:
    """Early error for models whose configured loss is not softmax cross-entropy."""
    config = getattr(_base_model(model), "config", None)
    problem = getattr(config, "problem_type", None)
    if problem in ("regression", "multi_label_classification"):
        raise _not_softmax_ce(f"the model's config.problem_type is {problem!r}")
    # transformers trains sequence and image classifiers alike (ForSequenceClassificationLoss): one label = MSE
    if type(_base_model(model)).__name__.endswith(("ForSequenceClassification", "ForImageClassification")) and \
            getattr(config, "num_labels", 2) == 1:
        raise _not_softmax_ce("a sequence or image classifier with num_labels=1 is trained as a regression (MSE)")


class SampledLabelCurvatureHook:
    """Forward hook (``with_kwargs=True``) adding the sampled-label curvature vector of each micro-batch.

    Runs only for training-mode forward passes with gradients enabled, and only when the
    optimizer's next step reads curvature (``needs_curvature()``), so steps that
    ``curvature_interval`` skips pay nothing. Logits are aligned with the labels the way
    the model's loss aligns them: unchanged for seq2seq LMs (T5), token and sequence
    classification; shifted by one for causal LMs (or ``shift_labels`` when given).
    ``num_items`` (the curvature's N) must count the label positions of the whole optimizer
    step on all ranks. It is the Trainer's ``num_items_in_batch`` when that reaches the forward
    pass (models that take loss kwargs): already over all ranks with the default
    ``average_tokens_across_devices=True``; with ``False`` it counts this rank only
    (``counts_all_ranks=False``), so the hook sums it over the ranks (one scalar all-reduce).
    Without ``num_items_in_batch`` it is an estimate: this micro-batch's count times
    ``gradient_accumulation_steps`` times the number of ranks.
    """

    def __init__(self, optimizer: Ginger, shift_labels: bool, accumulation_steps: int, counts_all_ranks: bool = True):
        self.optimizer = weakref.ref(optimizer)
        self.shift_labels = shift_labels
        self.accumulation_steps = accumulation_steps
        self.counts_all_ranks = counts_all_ranks

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        optimizer = self.optimizer()
        if optimizer is None or not module.training or not torch.is_grad_enabled() or not optimizer.needs_curvature():
            return
        if getattr(module, "_is_replica", False):  # what DataParallel's replicate() marks its copies with
            raise RuntimeError(f"Ginger curvature='mc': {DATA_PARALLEL}")
        labels = kwargs.get("labels")
        if labels is None:
            raise ValueError(
                "Ginger curvature='mc': the training forward pass got no `labels` (the Trainer pops them when "
                "label_smoothing_factor > 0 or a compute_loss_func is set). Pass labels to the model, or use "
                "--optim_args curvature=empirical."
            )
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, dict):
            logits = output.get("logits")
        if not isinstance(logits, torch.Tensor):
            raise _not_softmax_ce(f"the output of {type(module).__name__} has no `logits`")
        if kwargs.get("shift_labels") is not None:
            labels = kwargs["shift_labels"]
        elif self.shift_labels:
            logits, labels = logits[..., :-1, :], labels[..., 1:]
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise _not_softmax_ce(f"its labels are {labels.dtype} (regression or multi-label targets)")
        if logits.dim() != labels.dim() + 1 or logits.shape[:-1] != labels.shape or logits.shape[-1] < 2:
            raise _not_softmax_ce(
                f"logits of shape {tuple(logits.shape)} do not hold one class distribution per label "
                f"(labels of shape {tuple(labels.shape)})"
            )
        group = optimizer.curvature_group
        if group is None:  # FSDP2: the curvature is summed over the parameters' mesh (ginger_hf.sharded_curvature)
            group = sharded_curvature.mesh_group(p for g in optimizer.param_groups for p in g["params"])
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:  # an estimate: exact when every micro-batch (and rank) has as many labels
            num_items = int((labels != -100).sum()) * self.accumulation_steps * world_size(group)
        elif not self.counts_all_ranks and world_size(group) > 1:
            num_items = global_label_count(num_items, group)
        scaler = getattr(optimizer, "grad_scaler", None)  # fp16: scale like the loss (GingerAmpCallback)
        try:
            add_sampled_label_curvature(logits, labels.to(logits.device), optimizer, num_items=num_items,
                                        grad_scaler=scaler, model=module)  # FSDP2: reach its unsharded parameters
        except RuntimeError as exc:
            if "use_reentrant=True" in str(exc):  # torch's message from a reentrant checkpoint's backward
                raise RuntimeError(REENTRANT_CHECKPOINTING) from exc
            raise


_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> hook handle (one Ginger hook per model)


def attach_curvature_hook(
    model: nn.Module, optimizer: Ginger, accumulation_steps: int, counts_all_ranks: bool = True
) -> SampledLabelCurvatureHook:
    """Install (or replace) the sampled-label curvature hook of ``model`` for ``optimizer``.

    ``counts_all_ranks``: the Trainer's ``average_tokens_across_devices`` (whether its
    ``num_items_in_batch`` already counts the labels of every rank).
    """
    previous = _HOOKS.pop(model, None)
    if previous is not None:
        previous.remove()
    hook = SampledLabelCurvatureHook(optimizer, _loss_shifts_labels(model), accumulation_steps, counts_all_ranks)
    _HOOKS[model] = model.register_forward_hook(hook, with_kwargs=True)
    return hook


def reattach_after_fsdp(model: nn.Module) -> bool:
    """Move ``model``'s curvature hook after FSDP2's own forward hooks; returns whether it did.

    The Trainer builds the optimizer (and so installs the hook) before ``accelerator.prepare``
    applies ``fully_shard``, whose post-forward hook would then run after ours: the curvature
    pass would start while FSDP2 still counts the root as mid-forward. Re-registering puts ours last.
    """
    handle = _HOOKS.get(model)
    if handle is None or not sharded_curvature.is_fsdp2_model(model):
        return False
    hook = model._forward_hooks.get(handle.id)
    if hook is None or list(model._forward_hooks)[-1] == handle.id:
        return False
    handle.remove()
    _HOOKS[model] = model.register_forward_hook(hook, with_kwargs=True)
    return True
