"""Ginger diagnostics for the Trainer logs (``optim_args log_stats=true``).

``GingerStatsCallback`` sits in transformers' default callbacks (``ginger_hf.register``
puts it there, ahead of the TensorBoard / W&B reporters) and, at every training log
(``logging_steps``), adds ``ginger/*`` entries from the optimizer to the logs:

* ``ginger/s_mean``, ``ginger/s_max``: mean and max eigenvalue of the low-rank curvature models;
* ``ginger/curvature_norm``: norm of the curvature vector (all blocks) at the last refresh;
* ``ginger/skipped_blocks``: block steps skipped so far for non-finite inputs.

It does nothing unless the Trainer's optimizer is a Ginger with ``log_stats`` set.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .curvature import unwrap_ginger
from .optimizer import Ginger, get_curvature

__all__ = ["pending_curvature_norm", "ginger_stats", "GingerStatsCallback"]


@torch.no_grad()
def pending_curvature_norm(optimizer: Ginger) -> torch.Tensor | None:
    """Norm of the curvature vectors the next ``step()`` reads (no host sync), or ``None``."""
    squares = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None or not optimizer._refreshes(p, group):
                continue
            c = p.grad if group["curvature"] == "empirical" else get_curvature(p)
            if c is not None:
                squares.append(torch.linalg.vector_norm(c, dtype=torch.float32).square())
    if not squares:
        return None
    return torch.stack([x.to(squares[0].device) for x in squares]).sum().sqrt()


@torch.no_grad()
def ginger_stats(optimizer: Ginger) -> dict[str, float]:
    """Summary statistics of the optimizer's state (one host sync)."""
    s = [st["s"] for st in optimizer.state.values() if "s" in st]
    skipped = sum(int(st.get("skipped", 0)) for st in optimizer.state.values())
    stats: dict[str, float] = {"ginger/skipped_blocks": float(skipped)}
    if s:
        flat = torch.cat([x.reshape(-1).to(s[0].device) for x in s])
        stats["ginger/s_mean"] = flat.mean().item()
        stats["ginger/s_max"] = flat.max().item()
    norm = getattr(optimizer, "last_curvature_norm", None)
    if norm is not None:
        stats["ginger/curvature_norm"] = float(norm)
    return stats


class GingerStatsCallback(TrainerCallback):
    """Adds ``ginger_stats`` to the Trainer's training logs when the optimizer has ``log_stats``."""

    def on_log(self, args, state, control, logs=None, optimizer=None, **kwargs):
        ginger = unwrap_ginger(optimizer)
        if ginger is None or not getattr(ginger, "log_stats", False) or logs is None or "loss" not in logs:
            return
        stats = ginger_stats(ginger)
        logs.update(stats)
        # Trainer.log appended a copy of `logs` to the history just before calling on_log.
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(stats)
