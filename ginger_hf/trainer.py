"""``--optim ginger`` for the stock transformers ``Trainer`` / ``Seq2SeqTrainer``.

transformers picks optimizers from a closed ``str`` enum (``OptimizerNames``) and a
private handler table (``trainer_optimizer._OPTIMIZER_HANDLERS``). ``register()`` adds a
``GINGER = "ginger"`` member to the enum and a handler to the table, so
``TrainingArguments(optim="ginger")`` and ``--optim ginger`` work without subclassing the
Trainer. It checks those internals first and fails naming ``SUPPORTED_TRANSFORMERS``.

The handler returns ``TrainerGinger`` (a ``Ginger`` that also takes the model): built
from the Trainer's decay / no-decay groups, it splits them for ``optim_target_modules``
and ``lora_blocks`` (``ginger_hf.lora``) and installs ``SampledLabelCurvatureHook`` on the
model, which adds the sampled-label curvature vector at the end of every training forward
pass, before the Trainer's ``backward`` (shared forward, one extra ``autograd.grad``).
"""

from __future__ import annotations

import dataclasses
import enum
import warnings
import weakref
from typing import Any

import torch
from torch import nn

from transformers import TrainerCallback

from .curvature import add_sampled_label_curvature, unwrap_ginger
from .distributed import trainer_curvature_group, world_size
from .lora import LORA_BLOCKS, param_roles, split_param_groups
from .optimizer import CURVATURE_MODES, Ginger
from .stats import GingerStatsCallback, pending_curvature_norm

__all__ = [
    "SUPPORTED_TRANSFORMERS",
    "OPTIM_NAME",
    "register",
    "parse_optim_args",
    "TrainerGinger",
    "SampledLabelCurvatureHook",
]

OPTIM_NAME = "ginger"
SUPPORTED_TRANSFORMERS = ">=5.20,<5.25"  # = pyproject.toml; verified: 5.20.0, 5.24.0 (5.3.0, 5.10.4 count labels differently)

_STATE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "none": None}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


# -- optim_args ---------------------------------------------------------------------------


def _as_int(key, v):
    try:
        return int(v)
    except ValueError:
        raise ValueError(f"optim_args {key}: expected an integer, got {v!r}") from None


def _as_float(key, v):
    try:
        return float(v)
    except ValueError:
        raise ValueError(f"optim_args {key}: expected a number, got {v!r}") from None


def _as_choice(choices):
    def convert(key, v):
        if v.lower() not in choices:
            raise ValueError(f"optim_args {key}: expected one of {sorted(choices)}, got {v!r}")
        return choices[v.lower()] if isinstance(choices, dict) else v.lower()

    return convert


def _as_bool(key, v):
    if v.lower() in _TRUE:
        return True
    if v.lower() in _FALSE:
        return False
    raise ValueError(f"optim_args {key}: expected true or false, got {v!r}")


def _as_betas(key, v):
    parts = v.split(":")
    if len(parts) != 2:
        raise ValueError(f"optim_args {key}: expected BETA1:BETA2 (e.g. betas=0.9:0.99), got {v!r}")
    return tuple(_as_float(key, x) for x in parts)


# key -> converter of the string value; the Ginger keyword each feeds is in parse_optim_args.
OPTIM_ARGS = {
    "tau": _as_int,
    "damping": _as_float,
    "rho": lambda k, v: None if v.lower() in ("none", "null", "off") else _as_float(k, v),
    "beta1": _as_float,
    "beta2": _as_float,
    "betas": _as_betas,
    "curvature": _as_choice({m: m for m in CURVATURE_MODES}),
    "curvature_interval": _as_int,
    "state_dtype": _as_choice(_STATE_DTYPES),
    "lora_blocks": _as_choice({m: m for m in LORA_BLOCKS}),
    "log_stats": _as_bool,
}


def parse_optim_args(optim_args: dict[str, str] | str | None) -> dict[str, Any]:
    """Typed Ginger options from ``--optim_args`` (``"tau=8,rho=none,betas=0.9:0.99"`` or its dict).

    Raises ``ValueError`` naming the valid keys for an unknown key, and the expected
    type for a bad value. ``beta1``/``beta2`` are folded into ``betas`` by the handler.
    """
    if optim_args is None:
        return {}
    if isinstance(optim_args, str):
        pairs = [item for item in optim_args.replace(" ", "").split(",") if item]
        if any(item.count("=") != 1 for item in pairs):
            raise ValueError(f"optim_args: expected KEY=VALUE pairs separated by commas, got {optim_args!r}")
        optim_args = dict(item.split("=") for item in pairs)
    unknown = sorted(set(optim_args) - set(OPTIM_ARGS))
    if unknown:
        raise ValueError(
            f"--optim ginger: unknown optim_args key(s) {unknown}. Valid keys: {', '.join(sorted(OPTIM_ARGS))} "
            "(learning rate, weight decay and adam_epsilon come from --learning_rate, --weight_decay, --adam_epsilon)"
        )
    return {key: OPTIM_ARGS[key](key, str(value)) for key, value in optim_args.items()}


# -- the curvature hook -------------------------------------------------------------------


def _not_softmax_ce(what: str) -> ValueError:
    return ValueError(
        f"Ginger curvature='mc' samples labels from softmax(logits), so it needs a softmax cross-entropy model; {what}. "
        "Use --optim_args curvature=empirical for this model."
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


def _check_loss_kind(model: nn.Module) -> None:
    """Early error for models whose configured loss is not softmax cross-entropy."""
    config = getattr(_base_model(model), "config", None)
    problem = getattr(config, "problem_type", None)
    if problem in ("regression", "multi_label_classification"):
        raise _not_softmax_ce(f"the model's config.problem_type is {problem!r}")
    if type(_base_model(model)).__name__.endswith("ForSequenceClassification") and getattr(config, "num_labels", 2) == 1:
        raise _not_softmax_ce("a sequence classifier with num_labels=1 is trained as a regression (MSE)")


class SampledLabelCurvatureHook:
    """Forward hook (``with_kwargs=True``) adding the sampled-label curvature vector of each micro-batch.

    Runs only for training-mode forward passes with gradients enabled, and only when the
    optimizer's next step reads curvature (``needs_curvature()``), so steps that
    ``curvature_interval`` skips pay nothing. Logits are aligned with the labels the way
    the model's loss aligns them: unchanged for seq2seq LMs (T5), token and sequence
    classification; shifted by one for causal LMs (or ``shift_labels`` when given).
    ``num_items`` is the Trainer's ``num_items_in_batch`` (label positions of the whole
    optimizer step, on all ranks with the default ``average_tokens_across_devices``) when it
    reaches the forward pass (models that take loss kwargs), else an estimate: this
    micro-batch's count times ``gradient_accumulation_steps`` times the number of ranks.
    """

    def __init__(self, optimizer: Ginger, shift_labels: bool, accumulation_steps: int):
        self.optimizer = weakref.ref(optimizer)
        self.shift_labels = shift_labels
        self.accumulation_steps = accumulation_steps

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        optimizer = self.optimizer()
        if optimizer is None or not module.training or not torch.is_grad_enabled() or not optimizer.needs_curvature():
            return
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
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:  # an estimate: exact when every micro-batch (and rank) has as many labels
            ranks = world_size(optimizer.curvature_group)
            num_items = int((labels != -100).sum()) * self.accumulation_steps * ranks
        scaler = getattr(optimizer, "grad_scaler", None)  # fp16: scale like the loss (GingerAmpCallback)
        add_sampled_label_curvature(logits, labels.to(logits.device), optimizer, num_items=num_items, grad_scaler=scaler)


_HOOKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> hook handle (one Ginger hook per model)


def attach_curvature_hook(model: nn.Module, optimizer: Ginger, accumulation_steps: int) -> SampledLabelCurvatureHook:
    """Install (or replace) the sampled-label curvature hook of ``model`` for ``optimizer``."""
    previous = _HOOKS.pop(model, None)
    if previous is not None:
        previous.remove()
    hook = SampledLabelCurvatureHook(optimizer, _loss_shifts_labels(model), accumulation_steps)
    _HOOKS[model] = model.register_forward_hook(hook, with_kwargs=True)
    return hook


# -- the optimizer the Trainer builds ----------------------------------------------------


class TrainerGinger(Ginger):
    """``Ginger`` as ``--optim ginger`` builds it: takes the model, the roles of its parameters and Trainer settings.

    Same state and ``state_dict`` as ``Ginger``; on top it splits the Trainer's param
    groups (``ginger_hf.lora.split_param_groups``), installs the curvature hook on the
    model in ``mc`` mode, and with ``log_stats`` records the curvature-vector norm.
    """

    def __init__(
        self,
        params,
        *,
        hf_model: nn.Module,
        roles: dict[int, tuple[str, str | None]] | None = None,
        accumulation_steps: int = 1,
        log_stats: bool = False,
        **kwargs: Any,
    ):
        super().__init__(split_param_groups(params, roles or {}), **kwargs)
        self.curvature_group = trainer_curvature_group()  # DDP: sum mc curvature over ranks (issue 4)
        self.grad_scaler = None  # fp16: accelerate's GradScaler, set by GingerAmpCallback (issue 4)
        self.log_stats = log_stats
        self.last_curvature_norm = None
        if any(g["curvature"] == "mc" and g["algorithm"] == "ginger" for g in self.param_groups):
            attach_curvature_hook(hf_model, self, accumulation_steps)

    def step(self, closure=None):
        if self.log_stats:
            norm = pending_curvature_norm(self)
            if norm is not None:
                self.last_curvature_norm = norm
        return super().step(closure)


class GingerAmpCallback(TrainerCallback):
    """fp16 glue: the curvature hook scales like the loss, and a skipped step's curvature is dropped.

    The scaler lives on accelerate's wrapped optimizer, which exists only once training
    begins; the Trainer zeroes gradients with ``model.zero_grad()``, which Ginger cannot
    see, so pending curvature is dropped at the end of every optimizer step (after
    ``step()`` consumed it, or after the scaler skipped it for overflow).
    """

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        ginger = unwrap_ginger(optimizer)
        if isinstance(ginger, TrainerGinger):
            ginger.grad_scaler = getattr(optimizer, "scaler", None)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        ginger = unwrap_ginger(optimizer)
        if ginger is not None:
            ginger.zero_curvature()


def _ginger_handler(ctx) -> tuple[type, dict[str, Any]]:
    """transformers optimizer handler for ``optim="ginger"`` (see ``OptimizerContext``)."""
    args, model = ctx.args, ctx.model
    options = parse_optim_args(ctx.optim_args)
    if model is None:
        raise ValueError("--optim ginger needs the model (Trainer.create_optimizer passes it)")
    beta1, beta2 = options.pop("betas", (args.adam_beta1, args.adam_beta2))
    beta1, beta2 = options.pop("beta1", beta1), options.pop("beta2", beta2)
    lora_blocks = options.pop("lora_blocks", "separate")
    kwargs = {
        **ctx.optimizer_kwargs,  # lr
        "betas": (beta1, beta2),
        "eps": args.adam_epsilon,
        "hf_model": model,
        "roles": param_roles(model, args.optim_target_modules, lora_blocks),
        "accumulation_steps": args.gradient_accumulation_steps,
        "log_stats": options.pop("log_stats", False),
        **options,
    }
    if kwargs.get("curvature", "mc") == "mc":
        _check_loss_kind(model)
    return TrainerGinger, kwargs


# -- registration -------------------------------------------------------------------------


def _add_enum_member(enum_cls: type[enum.Enum], name: str, value: str) -> enum.Enum:
    """Add ``name = value`` to an existing ``str`` enum (idempotent); what ``aenum.extend_enum`` does."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = str.__new__(enum_cls, value)
    member._name_, member._value_ = name, value
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses new members
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    return member


def _unsupported(reason: str) -> RuntimeError:
    import transformers

    return RuntimeError(
        f"ginger_hf cannot register --optim ginger with transformers {transformers.__version__}: {reason}. "
        f"ginger_hf supports transformers{SUPPORTED_TRANSFORMERS}; install a version in that range."
    )


def register() -> None:
    """Make ``optim="ginger"`` known to ``TrainingArguments`` and the ``Trainer``. Idempotent."""
    try:
        from transformers import trainer as hf_trainer
        from transformers import trainer_optimizer, training_args
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise _unsupported(f"cannot import its Trainer modules ({e})") from e
    names = getattr(training_args, "OptimizerNames", None)
    handlers = getattr(trainer_optimizer, "_OPTIMIZER_HANDLERS", None)
    context = getattr(trainer_optimizer, "OptimizerContext", None)
    if not (isinstance(names, type) and issubclass(names, str) and issubclass(names, enum.Enum)):
        raise _unsupported("training_args.OptimizerNames is not a str Enum")
    if not isinstance(handlers, dict) or getattr(hf_trainer, "_OPTIMIZER_HANDLERS", None) is not handlers:
        raise _unsupported("the Trainer does not pick optimizers from trainer_optimizer._OPTIMIZER_HANDLERS")
    fields = {f.name for f in dataclasses.fields(context)} if dataclasses.is_dataclass(context) else set()
    if not {"args", "model", "optimizer_kwargs", "optim_args"} <= fields:
        raise _unsupported("trainer_optimizer.OptimizerContext lacks args/model/optimizer_kwargs/optim_args")
    if not isinstance(getattr(hf_trainer, "DEFAULT_CALLBACKS", None), list):
        raise _unsupported("transformers.trainer.DEFAULT_CALLBACKS is not a list")

    import transformers
    from packaging.specifiers import SpecifierSet

    if transformers.__version__ not in SpecifierSet(SUPPORTED_TRANSFORMERS, prereleases=True):
        warnings.warn(
            f"ginger_hf is tested with transformers{SUPPORTED_TRANSFORMERS}, found {transformers.__version__}: "
            "--optim ginger registers, but the Trainer's label counting (the curvature scale) may differ.",
            stacklevel=2,
        )
    member = _add_enum_member(names, OPTIM_NAME.upper(), OPTIM_NAME)
    if names(OPTIM_NAME) is not member or member not in list(names):
        raise _unsupported("adding a member to OptimizerNames did not take effect")
    handlers[member] = _ginger_handler
    if GingerStatsCallback not in hf_trainer.DEFAULT_CALLBACKS:
        hf_trainer.DEFAULT_CALLBACKS.append(GingerStatsCallback)
    if GingerAmpCallback not in hf_trainer.DEFAULT_CALLBACKS:
        hf_trainer.DEFAULT_CALLBACKS.append(GingerAmpCallback)
