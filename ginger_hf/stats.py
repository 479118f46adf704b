"""Ginger diagnostics for the Trainer logs (``optim_args log_stats=true``).

With ``optimizer.step_stats`` set to a dict, every step adds its sums there (``fused.ginger``
and ``Ginger.step``); at every training log (``logging_steps``) ``GingerStatsCallback`` turns
the sums since the previous log into these entries and starts over:

* ``ginger/update_to_grad``: ``|u| / |g|``, the preconditioned direction's norm relative to
  the gradient's (before any clip; all Ginger tensors);
* ``ginger/span_share``: ``|P u| / |u|`` with ``P`` the projection onto the blocks'
  ``span(U)``: how much of the step the low-rank curvature model steers;
* ``ginger/clipped_fraction``: share of coordinates the ``rho`` clip cut (0 without ``rho``);
* ``ginger/s_mean``, ``ginger/s_max``: eigenvalues of the low-rank curvature models;
* ``ginger/curvature_norm``: norm of the curvature vectors (all tensors) at the last refresh,
  after the data-parallel sum;
* ``ginger/skipped_blocks``, ``ginger/skipped_curvature``: tensor steps skipped for a
  non-finite gradient, and curvature refreshes skipped for a non-finite curvature vector.

It does nothing unless the Trainer's optimizer is a Ginger with ``log_stats`` set. The
registration puts it in transformers' default callbacks, ahead of the TensorBoard / W&B
reporters, so the entries go wherever the loss goes.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback

from .optimizer import Ginger, unwrap_ginger

__all__ = ["ginger_stats", "GingerStatsCallback"]


@torch.no_grad()
def ginger_stats(optimizer: Ginger) -> dict[str, float]:
    """Summary statistics of the optimizer's state and of the steps since the last call (one host sync)."""
    states = [st for st in optimizer.state.values() if "s" in st]
    stats: dict[str, float] = {
        "ginger/skipped_blocks": float(sum(int(st.get("skipped", 0)) for st in optimizer.state.values())),
        "ginger/skipped_curvature": float(sum(int(st.get("curvature_skipped", 0)) for st in states)),
    }
    s = [st["s"].reshape(-1) for st in states if st["s"].numel()]
    if s:
        flat = torch.cat([x.to(s[0].device) for x in s])
        stats["ginger/s_mean"] = flat.mean().item()
        stats["ginger/s_max"] = flat.max().item()
    sums = optimizer.step_stats
    if sums and sums.get("numel"):
        stats["ginger/update_to_grad"] = (sums["update_sq"] / max(sums["grad_sq"], 1e-300)) ** 0.5
        stats["ginger/span_share"] = (sums["span_sq"] / max(sums["update_sq"], 1e-300)) ** 0.5
        stats["ginger/clipped_fraction"] = sums["clipped"] / sums["numel"]
    if sums and "curvature_sq" in sums:
        stats["ginger/curvature_norm"] = sums["curvature_sq"] ** 0.5
    if sums is not None:
        curvature = {k: v for k, v in sums.items() if k == "curvature_sq"}
        sums.clear()
        sums.update(curvature)  # the last refresh's norm stays until the next refresh
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
