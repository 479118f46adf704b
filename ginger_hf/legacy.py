"""Checkpoints of older ginger-hf versions: what their missing keys meant when they were written.

Before 2026-12-02 (commit 4e19b1f) Ginger was the paper's method only, one block per tensor:
its param groups carry no ``power``, ``relative_damping``, ``bias_correction`` or ``blocks``,
and its per-tensor state is flat (``m`` of ``numel`` values, ``U`` of ``(n, numel)``, ``s`` of
``(n,)``, ``R`` of ``(n, n)``, no ``e`` and no refresh counters). Such a checkpoint loads with
those keys at their meaning then, the state in today's layout (one block), and one warning;
its ``add_sampled_label_curvature`` scaled vectors by ``1 / sqrt(N)``, so the optimizer's
``curvature_scale`` becomes ``"sqrt"``. It then steps as that version did.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

__all__ = ["BEFORE_BLOCKS", "CURVATURE_SCALE_BEFORE_BLOCKS", "fill_missing_group_keys", "upgrade_flat_states"]

# The keys added on 2026-12-02, at the values that version computed with (the paper's).
BEFORE_BLOCKS = dict(power=1.0, relative_damping=0.0, bias_correction=False, blocks="tensor")
CURVATURE_SCALE_BEFORE_BLOCKS = "sqrt"


def fill_missing_group_keys(groups: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Saved param groups with the keys of ``BEFORE_BLOCKS`` they lack added at their old values (one warning)."""
    missing = sorted({k for g in groups for k in BEFORE_BLOCKS if k not in g})
    if not missing:
        return groups
    warnings.warn(
        f"Ginger: this checkpoint was written by ginger-hf before 2026-12-02 and has no {missing} in its param "
        f"groups; they take their meaning then ({', '.join(f'{k}={BEFORE_BLOCKS[k]!r}' for k in missing)}: the "
        f"paper's configuration), and curvature vectors are scaled by 1/sqrt(N) (curvature_scale="
        f"{CURVATURE_SCALE_BEFORE_BLOCKS!r}) as then.", stacklevel=3,
    )
    return [{**BEFORE_BLOCKS, **g} for g in groups]


def upgrade_flat_states(param_groups: list[dict[str, Any]], states: dict[Tensor, dict[str, Any]]) -> None:
    """Rewrite the loaded flat Ginger states in today's layout (a joint group's state on its first parameter)."""
    for group in param_groups:
        if group["algorithm"] != "ginger" or not group["params"]:
            continue
        if group["joint"]:
            owners = [(group["params"][0], (sum(p.numel() for p in group["params"]),))]
        else:
            owners = [(p, p.shape) for p in group["params"]]
        for p, shape in owners:
            state = states.get(p)
            if state and is_flat(state):
                upgrade_flat_state(state, shape, group["curvature_interval"])


def is_flat(state: dict[str, Any]) -> bool:
    """A Ginger tensor state in the pre-2026-12-02 layout (``s`` of shape ``(n,)``)."""
    s = state.get("s")
    return isinstance(s, Tensor) and s.dim() == 1 and "e" not in state


def upgrade_flat_state(state: dict[str, Any], shape: torch.Size | tuple[int, ...], interval: int) -> None:
    """Rewrite one flat state in place as today's single block of a tensor of ``shape``.

    ``e`` (the gradient energy EMA) starts at zero: with ``relative_damping=0`` it is never read.
    ``curvature_steps`` counts the refreshes the old schedule made (steps 1, 1+k, ...); only bias
    correction, off then, reads it.
    """
    m, U, s, R = state["m"], state["U"], state["s"], state["R"]
    n = s.shape[0]
    step = int(state.get("step", 0))
    state.update(
        m=m.reshape(shape), U=U.reshape(n, *shape), s=s.reshape(1, n), R=R.reshape(1, n, n),
        e=torch.zeros(1, dtype=torch.float64, device=s.device),
        curvature_steps=-(-step // interval), curvature_skipped=0,
    )
    state.setdefault("step", step)
    state.setdefault("skipped", 0)
