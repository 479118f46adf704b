"""``--optim ginger`` for the stock transformers ``Trainer`` / ``Seq2SeqTrainer``.

``ginger_hf.registration`` makes the name known to transformers; this module is what the
name builds. The handler returns ``TrainerGinger`` (a ``Ginger`` that also takes the model): built
from the Trainer's decay / no-decay groups, it splits them for ``optim_target_modules``
and ``lora_blocks`` (``ginger_hf.lora``) and installs the sampled-label curvature hook
(``ginger_hf.curvature_hook``) on the model in ``mc`` mode. A process that sees several GPUs
would make the Trainer wrap the model in ``torch.nn.DataParallel``: refused up front.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from .curvature_hook import attach_curvature_hook, check_loss_kind, reattach_after_fsdp
from .distributed import DATA_PARALLEL, trainer_curvature_group
from .lora import param_roles, split_param_groups
from .optim_args import parse_optim_args
from .optimizer import PRESETS, Ginger, unwrap_ginger

__all__ = ["TrainerGinger", "GingerAmpCallback", "ginger_handler", "describe"]

hf_logging.get_logger()  # transformers' library logger, configured; ours is under it (shown like the Trainer's lines)
logger = logging.getLogger("transformers.trainer.ginger")
_NOT_SETTINGS = ("params", "param_names", "lr", "initial_lr")  # the lr is the scheduler's


def _settings(group: dict[str, Any], keys) -> dict[str, Any]:
    return {k: group[k] for k in keys if k in group and k not in _NOT_SETTINGS}


def describe(optimizer: Ginger) -> str:
    """One line: Ginger, its preset, the effective settings that differ from it, and what gets which update."""
    preset = PRESETS[optimizer.preset]
    differ: dict[str, Any] = {}
    for group in optimizer.param_groups:
        if group["algorithm"] == "ginger":
            differ.update({k: v for k, v in _settings(group, preset).items() if v != preset[k]})
    if optimizer.curvature_scale != preset["curvature_scale"]:
        differ["curvature_scale"] = optimizer.curvature_scale
    if optimizer.backend is not None:
        differ["backend"] = optimizer.backend
    groups = optimizer.param_groups
    counts = {a: sum(len(g["params"]) for g in groups if g["algorithm"] == a) for a in ("ginger", "adamw")}
    joint = sum(1 for g in groups if g["joint"])
    line = (f"Optimizer: Ginger (preset={optimizer.preset!r}), lr={float(optimizer.defaults['lr']):g}; "
            f"settings that differ from the preset: {', '.join(f'{k}={v!r}' for k, v in differ.items()) or 'none'}; "
            f"{counts['ginger']} tensors take Ginger steps")
    line += f" ({joint} joint LoRA blocks)" if joint else ""
    return line + (f", {counts['adamw']} take AdamW steps" if counts["adamw"] else "")


class TrainerGinger(Ginger):
    """``Ginger`` as ``--optim ginger`` builds it: takes the model, the roles of its parameters and Trainer settings.

    Same state and ``state_dict`` as ``Ginger``; on top it splits the Trainer's param
    groups (``ginger_hf.lora.split_param_groups``), installs the curvature hook on the
    model in ``mc`` mode, and with ``log_stats`` collects ``ginger_hf.stats`` (``Ginger.step``
    records the curvature norm after the data-parallel sum, so every rank logs the same value).
    ``counts_all_ranks`` is the Trainer's ``average_tokens_across_devices``.
    """

    _COPIED = {**Ginger._COPIED, "log_stats": False}
    _NOT_COPIED = {**Ginger._NOT_COPIED, "grad_scaler": None}

    def __init__(
        self,
        params,
        *,
        hf_model: nn.Module,
        roles: dict[int, tuple[str, str | None]] | None = None,
        accumulation_steps: int = 1,
        counts_all_ranks: bool = True,
        log_stats: bool = False,
        **kwargs: Any,
    ):
        super().__init__(split_param_groups(params, roles or {}), **kwargs)
        self.curvature_group = trainer_curvature_group()  # DDP: sum mc curvature over ranks (FSDP2: the hook does)
        self.grad_scaler = None  # fp16: accelerate's GradScaler, set by GingerAmpCallback
        self.log_stats = log_stats
        if log_stats:
            self.step_stats = {}  # ginger_hf.stats
        if any(g["curvature"] == "mc" and g["algorithm"] == "ginger" for g in self.param_groups):
            attach_curvature_hook(hf_model, self, accumulation_steps, counts_all_ranks)
        logger.info(describe(self))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as torch does (the checkpoint's settings win), with a warning naming the settings that change.

        A resumed run with other ``--optim_args`` keeps the checkpoint's settings; the warning
        says which, so a changed setting is never silently ignored.
        """
        requested = [_settings(g, self.defaults) for g in self.param_groups]
        super().load_state_dict(state_dict)
        changes = {}
        for before, group in zip(requested, self.param_groups):
            after = _settings(group, self.defaults)
            changes.update({k: (before[k], after[k]) for k in before if k in after and before[k] != after[k]})
        if changes:
            logger.warning(
                "Ginger: the checkpoint's optimizer settings differ from the requested ones; the checkpoint's are "
                "used (as torch optimizers load them): "
                + ", ".join(f"{k}={new!r} (requested {old!r})" for k, (old, new) in changes.items())
                + f". (curvature_scale is not part of a checkpoint: the requested {self.curvature_scale!r} is "
                "used.) To train with the requested settings, start from the model weights without the optimizer state."
            )


class GingerAmpCallback(TrainerCallback):
    """fp16 glue: the curvature hook scales like the loss, and a skipped step's curvature is dropped.

    Also moves the curvature hook after FSDP2's forward hooks when the Trainer sharded the
    model after building the optimizer (``ginger_hf.curvature_hook.reattach_after_fsdp``).

    The scaler lives on accelerate's wrapped optimizer, which exists only once training
    begins; the Trainer zeroes gradients with ``model.zero_grad()``, which Ginger cannot
    see, so pending curvature is dropped at the end of every optimizer step (after
    ``step()`` consumed it, or after the scaler skipped it for overflow).
    """

    def on_train_begin(self, args, state, control, optimizer=None, model=None, **kwargs):
        ginger = unwrap_ginger(optimizer)
        if isinstance(ginger, TrainerGinger):
            ginger.grad_scaler = getattr(optimizer, "scaler", None)
            if model is not None:
                reattach_after_fsdp(model)  # FSDP2 sharded the model after the hook was installed

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        ginger = unwrap_ginger(optimizer)
        if ginger is not None:
            ginger.zero_curvature()


def ginger_handler(ctx) -> tuple[type, dict[str, Any]]:
    """transformers optimizer handler for ``optim="ginger"`` (see ``OptimizerContext``)."""
    args, model = ctx.args, ctx.model
    options = parse_optim_args(ctx.optim_args)
    if model is None:
        raise ValueError("--optim ginger needs the model (Trainer.create_optimizer passes it)")
    if args.n_gpu > 1:  # Trainer._wrap_model would wrap the model in nn.DataParallel
        raise RuntimeError(f"--optim ginger: this process sees {args.n_gpu} GPUs. {DATA_PARALLEL}")
    # beta1 is the momentum rate in Adam and Ginger alike; --adam_beta2 (Adam's second-moment rate,
    # 0.999 by default) never becomes Ginger's curvature EMA: that comes from optim_args or the preset.
    beta1, beta2 = options.pop("betas", (args.adam_beta1, PRESETS[options.get("preset", "recommended")]["betas"][1]))
    beta1, beta2 = options.pop("beta1", beta1), options.pop("beta2", beta2)
    lora_blocks = options.pop("lora_blocks", "separate")
    kwargs = {
        **ctx.optimizer_kwargs,  # lr
        "betas": (beta1, beta2),
        "eps": args.adam_epsilon,
        "hf_model": model,
        "roles": param_roles(model, args.optim_target_modules, lora_blocks),
        "accumulation_steps": args.gradient_accumulation_steps,
        "counts_all_ranks": args.average_tokens_across_devices,
        "log_stats": options.pop("log_stats", False),
        **options,
    }
    if kwargs.get("curvature", "mc") == "mc":
        check_loss_kind(model)
    return TrainerGinger, kwargs
