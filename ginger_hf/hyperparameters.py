"""Ginger's hyper-parameters: the presets, the checks, and how a param group gets its values.

Every value can be set per param group. A group takes what it names, then its own
``preset``'s values (if it names a preset), then the optimizer's defaults. Errors follow
torch's optimizers: ``ValueError`` for a bad value (a Tensor ``lr`` of more than one
element included), ``TypeError`` for a value of the wrong kind; each names the argument
and what is allowed.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .functional import BLOCKS

__all__ = ["PRESETS", "CURVATURE_MODES", "CURVATURE_SCALES", "ALGORITHMS", "DEFAULT_LR", "PRESET",
           "validate_hyperparameters", "apply_group_preset", "split_named_params"]

CURVATURE_MODES = ("mc", "empirical")
CURVATURE_SCALES = ("mean", "sqrt")
ALGORITHMS = ("ginger", "adamw")

# What Ginger(params, lr) computes unless told otherwise, and the paper's configuration
# (GINGER.md section 5), one argument away. Why each value: docs/research.md.
PRESETS: dict[str, dict[str, Any]] = {
    "recommended": dict(betas=(0.9, 0.99), tau=4, blocks="row", power=0.5, damping=1e-12, relative_damping=0.1,
                        rho=None, bias_correction=True, curvature="mc", curvature_interval=4, curvature_scale="mean"),
    "paper": dict(betas=(0.9, 0.99), tau=4, blocks="tensor", power=1.0, damping=1e-5, relative_damping=0.0,
                  rho=1.0, bias_correction=False, curvature="mc", curvature_interval=1, curvature_scale="sqrt"),
}
DEFAULT_LR = 1e-3


class _Preset:
    """Marks an argument left to the preset."""

    def __repr__(self) -> str:
        return "<preset>"


PRESET = _Preset()


def _is_real_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_preset(preset: Any) -> None:
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ValueError(f"Ginger: preset must be one of {tuple(PRESETS)}, got {preset!r}")


def _check_lr(lr: Any) -> None:
    """A finite float >= 0, or a one-element real Tensor holding one (torch's optimizers take both)."""
    if isinstance(lr, Tensor):
        if lr.numel() != 1 or not lr.is_floating_point():
            raise ValueError(f"Ginger: Tensor lr must be a 1-element floating point tensor, got shape "
                             f"{tuple(lr.shape)} and dtype {lr.dtype}")
        value = lr.item()
    else:
        value = lr
    if not _is_real_number(value) or value < 0:
        raise ValueError(f"Ginger: lr must be a finite float >= 0, got {lr!r}")


def validate_hyperparameters(group: dict[str, Any]) -> None:
    """Raise ``ValueError``/``TypeError`` naming the argument and its allowed values."""
    tau = group["tau"]
    if isinstance(tau, bool) or not isinstance(tau, int):
        raise TypeError(f"Ginger: tau must be an integer >= 1, got {tau!r}")
    if tau < 1:
        raise ValueError(f"Ginger: tau must be an integer >= 1, got {tau!r}")
    _check_lr(group["lr"])
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Ginger: betas must be a pair (beta1, beta2), each in [0, 1), got {betas!r}")
    for name, beta in zip(("beta1", "beta2"), betas):
        if not _is_real_number(beta) or not 0.0 <= beta < 1.0:
            raise ValueError(f"Ginger: betas: {name} must be in [0, 1), got {beta!r}")
    damping = group["damping"]
    if not _is_real_number(damping) or damping <= 0:
        raise ValueError(f"Ginger: damping must be a finite float > 0, got {damping!r}")
    rel = group["relative_damping"]
    if not _is_real_number(rel) or rel < 0:
        raise ValueError(f"Ginger: relative_damping must be a finite float >= 0, got {rel!r}")
    power = group["power"]
    if not _is_real_number(power) or not 0 < power <= 1:
        raise ValueError(f"Ginger: power must be in (0, 1] (1: G^-1 as in the paper, 0.5: G^-1/2), got {power!r}")
    if group["blocks"] not in BLOCKS:
        raise ValueError(f"Ginger: blocks must be one of {BLOCKS}, got {group['blocks']!r}")
    if not isinstance(group["bias_correction"], bool):
        raise TypeError(f"Ginger: bias_correction must be True or False, got {group['bias_correction']!r}")
    rho = group["rho"]
    if rho is not None and (not _is_real_number(rho) or rho <= 0):
        raise ValueError(f"Ginger: rho must be a float > 0, or None to disable clipping, got {rho!r}")
    weight_decay = group["weight_decay"]
    if not _is_real_number(weight_decay) or weight_decay < 0:
        raise ValueError(f"Ginger: weight_decay must be a finite float >= 0, got {weight_decay!r}")
    if group["curvature"] not in CURVATURE_MODES:
        raise ValueError(f"Ginger: curvature must be one of {CURVATURE_MODES}, got {group['curvature']!r}")
    interval = group["curvature_interval"]
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"Ginger: curvature_interval must be an integer >= 1, got {interval!r}")
    state_dtype = group["state_dtype"]
    if state_dtype is not None and not (isinstance(state_dtype, torch.dtype) and state_dtype.is_floating_point):
        raise TypeError(f"Ginger: state_dtype must be None or a floating torch.dtype, got {state_dtype!r}")
    if group["algorithm"] not in ALGORITHMS:
        raise ValueError(f"Ginger: algorithm must be one of {ALGORITHMS}, got {group['algorithm']!r}")
    eps = group["eps"]
    if not _is_real_number(eps) or eps <= 0:
        raise ValueError(f"Ginger: eps (of algorithm='adamw' groups) must be a finite float > 0, got {eps!r}")
    if not isinstance(group["joint"], bool):
        raise TypeError(f"Ginger: joint must be True or False, got {group['joint']!r}")
    if group["joint"]:
        if group["algorithm"] != "ginger":
            raise ValueError("Ginger: joint=True (one block for the whole group) needs algorithm='ginger'")
        kinds = {(p.dtype, p.device) for p in group["params"] if isinstance(p, Tensor)}
        if len(kinds) > 1:
            raise ValueError(f"Ginger: a joint=True group needs one dtype and device for all its params, got {kinds}")
    for p in group["params"]:
        if not isinstance(p, Tensor):
            raise TypeError(f"Ginger: params must be tensors (or (name, tensor) pairs), got {type(p).__name__}")
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"Ginger: parameters must be real floating point tensors, got dtype {p.dtype}")


def apply_group_preset(group: dict[str, Any], curvature_scale: str) -> dict[str, Any]:
    """The group with its ``preset`` (if any) resolved: the preset's values for the keys it does not name.

    ``curvature_scale`` is the optimizer's, one for all groups (the sampled-label vectors of a
    step are scaled at once): a group whose preset would use another scale for ``mc``
    curvature is refused rather than run half in that preset.
    """
    if "preset" not in group:
        return group
    group = dict(group)
    name = group.pop("preset")
    check_preset(name)
    values = {k: v for k, v in PRESETS[name].items() if k != "curvature_scale"}
    group = {**values, **group}
    wants = PRESETS[name]["curvature_scale"]
    if group["curvature"] == "mc" and group.get("algorithm", "ginger") == "ginger" and wants != curvature_scale:
        raise ValueError(
            f"Ginger: a param group with preset={name!r} and curvature='mc' needs curvature_scale={wants!r}, but the "
            f"optimizer scales curvature vectors by {curvature_scale!r} (one scale for all groups). Pass "
            f"curvature_scale={wants!r} to Ginger(...), or preset={name!r} for the whole optimizer, or give this "
            "group curvature='empirical'."
        )
    return group


def split_named_params(params: list[Any]) -> tuple[list[Any], list[str] | None]:
    """``(tensors, names)`` from a group's params given as tensors or as ``(name, tensor)`` pairs (torch >= 2.6).

    Mixing named and unnamed params in one group is a ``ValueError``, as in torch.
    """
    named = [isinstance(p, tuple) for p in params]
    if not any(named):
        return params, None
    if not all(named):
        raise ValueError("Ginger: all params of a group must be given with names ((name, tensor) pairs, as "
                         "model.named_parameters() yields them) or all without; some param names are missing")
    if any(len(p) != 2 or not isinstance(p[0], str) for p in params):
        raise TypeError("Ginger: a named parameter must be a (name: str, tensor) pair")
    return [p[1] for p in params], [p[0] for p in params]
