"""``--optim_args`` for ``--optim ginger``: typed Ginger options from ``"key=value,..."``.

Every key is a ``Ginger`` keyword except ``beta1``/``beta2``/``betas`` (folded into ``betas``),
``lora_blocks`` (``ginger_hf.lora``) and ``log_stats`` (``ginger_hf.stats``). A key left out
takes the preset's value (``preset=recommended`` unless given), never a value from an AdamW
flag: ``--adam_beta2`` (0.999 by default) is Adam's second-moment rate and would silently
become Ginger's curvature EMA, so Ginger ignores it. ``--adam_beta1`` is the same momentum
rate in both and is used; ``--adam_epsilon`` feeds the AdamW part of LoRA splits.
"""

from __future__ import annotations

from typing import Any

import torch

from .functional import BLOCKS
from .lora import LORA_BLOCKS
from .optimizer import CURVATURE_MODES, CURVATURE_SCALES, PRESETS

__all__ = ["OPTIM_ARGS", "parse_optim_args"]

_STATE_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64, "none": None}
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


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
    "blocks": _as_choice({b: b for b in BLOCKS}),
    "power": _as_float,
    "relative_damping": _as_float,
    "bias_correction": _as_bool,
    "preset": _as_choice({p: p for p in PRESETS}),
    "curvature_scale": _as_choice({s: s for s in CURVATURE_SCALES}),
    "backend": _as_choice({"auto": None, "kernel": "kernel", "compile": "compile", "torch": "torch"}),
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
