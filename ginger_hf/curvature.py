"""Sampled-label curvature vectors for softmax cross-entropy models (GINGER.md section 3).

The curvature vector of a step is ``c = sqrt(N) * grad( mean_i CE(logits_i, y~_i) )``
with ``y~_i ~ softmax(logits_i)`` drawn at every position that has a real label and
``N`` the number of label positions in the optimizer step, i.e.
``c = sum_i grad CE(logits_i, y~_i) / sqrt(N)``. Micro-batches add their share.

The gradient is taken with ``torch.autograd.grad``: it never touches ``.grad`` and
never fires distributed data parallel's gradient hooks, so the forward pass can be
shared with the true loss. FSDP2 (``fully_shard``) parameters are not in the graph (the
forward runs on unsharded copies): ``ginger_hf.sharded_curvature`` takes the gradient with
respect to those copies and reduce-scatters it to each rank's slice.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from . import sharded_curvature, sharding
from .optimizer import CURVATURE_SCALES, Ginger, unwrap_ginger
from .pending import add_curvature, get_curvature, set_curvature

__all__ = ["sample_labels", "sampled_label_loss", "add_sampled_label_curvature", "unwrap_ginger"]


@torch.no_grad()
def sample_labels(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, generator: torch.Generator | None = None
) -> Tensor:
    """Labels drawn from ``softmax(logits)`` where ``labels != ignore_index``; ``ignore_index`` elsewhere.

    Inverse-CDF sampling: one uniform number per position, located in the row's cumulative
    probabilities. ``torch.multinomial`` draws an exponential number per vocabulary entry
    instead, over an order of magnitude slower on CPU for vocabularies of thousands.
    """
    mask = labels != ignore_index
    sampled = torch.full_like(labels, ignore_index)
    probs = torch.softmax(logits[mask].float(), dim=-1)
    if probs.numel():
        cdf = probs.cumsum_(-1)
        u = torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device) * cdf[:, -1:]
        # right=True: the first entry whose cumulative probability exceeds u, never a zero-probability one
        sampled[mask] = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp_max_(cdf.shape[-1] - 1)
    return sampled


def sampled_label_loss(
    logits: Tensor, labels: Tensor, ignore_index: int = -100, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Summed cross-entropy at labels sampled from the model, and the number of label positions."""
    sampled = sample_labels(logits, labels, ignore_index, generator)
    loss = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), sampled.reshape(-1), ignore_index=ignore_index, reduction="sum"
    )
    return loss, (labels != ignore_index).sum()


def add_sampled_label_curvature(
    logits: Tensor,
    labels: Tensor,
    params: Iterable[Tensor] | torch.optim.Optimizer,
    *,
    num_items: int | Tensor | None = None,
    ignore_index: int = -100,
    generator: torch.Generator | None = None,
    retain_graph: bool = True,
    grad_scaler: torch.amp.GradScaler | None = None,
    scale: str | None = None,
    model: torch.nn.Module | None = None,
) -> bool:
    """Add this micro-batch's sampled-label curvature to ``param.curvature``.

    Args:
        logits: ``(..., vocab)`` logits aligned with ``labels`` (shift them first for causal LMs).
        labels: integer labels, ``ignore_index`` where there is none.
        params: the parameters, or the ``Ginger`` optimizer (possibly wrapped): then only the
            blocks that refresh at the next step get a vector, and nothing is computed on
            steps that ``curvature_interval`` skips.
        num_items: label positions in the whole optimizer step (all micro-batches, and all
            ranks when the optimizer sums curvature over a DDP group, see
            ``ginger_hf.sync_curvature``; then it is required); defaults to this
            micro-batch's count, which is right for one process without gradient accumulation.
        retain_graph: keep the graph so the true loss can be back-propagated afterwards.
        grad_scaler: an fp16 ``GradScaler``: the sampled loss is scaled like the true loss
            (no fp16 underflow) and the vector unscaled, as the scaler unscales ``.grad``.
            Defaults to the wrapper's ``scaler`` (accelerate's ``AcceleratedOptimizer``).
        scale: ``"mean"``: ``sum_i grad CE(y~_i) / N``, a mini-batch gradient at sampled labels, whose
            outer product estimates the gradient's covariance (what Adam's second moment tracks);
            ``"sqrt"``: ``/ sqrt(N)``, the paper's, whose outer product estimates the GGN itself.
            Defaults to the optimizer's ``curvature_scale`` when ``params`` is a Ginger, else
            ``"mean"``.
        model: the FSDP2 (``fully_shard``) model, needed when ``params`` holds its sharded
            parameters; defaults to the model ``ginger_hf.sync_curvature(optimizer, model)``
            recorded. The vector is then summed over the mesh (one reduce-scatter per call) and
            each rank keeps its slice; ``num_items`` must count the labels of all ranks.

    Returns whether a curvature vector was computed.
    """
    summed_over_ranks = False
    if isinstance(params, torch.optim.Optimizer):
        ginger = unwrap_ginger(params)
        if ginger is None:
            raise TypeError("add_sampled_label_curvature: params is an optimizer but not (a wrapper of) ginger_hf.Ginger")
        if grad_scaler is None:
            grad_scaler = getattr(params, "scaler", None)
        summed_over_ranks = ginger.curvature_group is not None
        model = model if model is not None else sharded_curvature.model_of(ginger)
        params = ginger.curvature_params()
        scale = scale or ginger.curvature_scale
    scale = scale or "mean"
    if scale not in CURVATURE_SCALES:
        raise ValueError(f"add_sampled_label_curvature: scale must be one of {CURVATURE_SCALES}, got {scale!r}")
    fsdp_model = sharded_curvature.is_fsdp2_model(model)
    if fsdp_model:  # model.parameters() after a forward lists the root's unsharded copies: use the sharded ones
        params = sharded_curvature.sharded_params(list(params), model)
    params = [p for p in params if p.requires_grad]
    if not params:
        return False
    fsdp = any(sharding.is_dtensor(p) for p in params)
    if fsdp and not fsdp_model:  # never a silent zero vector
        raise TypeError(sharded_curvature.NOT_IN_GRAPH)
    summed_over_ranks = summed_over_ranks or (fsdp and sharded_curvature.mesh_group(params) is not None)
    if num_items is None and summed_over_ranks:
        raise ValueError(
            "add_sampled_label_curvature: num_items is required when Ginger sums curvature over ranks: pass the "
            "optimizer step's label count on all ranks, e.g. accelerator.gather(count).sum()"
        )
    loss, count = sampled_label_loss(logits, labels, ignore_index, generator)
    n = int(num_items if num_items is not None else count)
    if n <= 0:
        raise ValueError(f"add_sampled_label_curvature: num_items must be >= 1, got {n}")
    factor = 1.0 / (n if scale == "mean" else math.sqrt(n))
    if grad_scaler is not None and grad_scaler.is_enabled():
        loss = grad_scaler.scale(loss)
        factor /= grad_scaler.get_scale()  # a power of two: unscaling is exact, as for .grad
    if fsdp:  # FSDP2: each rank's slice of the vector summed over ranks; plain parameters as below
        grads = sharded_curvature.sharded_mc_grads(loss, params, model, retain_graph=retain_graph, factor=factor)
    else:
        grads = [g.mul_(factor) if g is not None else None  # autograd.grad's own buffers
                 for g in torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)]
    for p, g in zip(params, grads):
        contribution = g if g is not None else torch.zeros_like(p)
        if get_curvature(p) is None:
            set_curvature(p, contribution)
        else:
            add_curvature(p, contribution)
    return True
