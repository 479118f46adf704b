"""One Ginger step for a list of tensors: the front function over the sibling implementations.

``ginger`` has one signature (that of ``functional.ginger``, the reference, plus the backend and
the sharding arguments) and dispatches each tensor, as ``torch/optim/adam.py`` dispatches to its
single-tensor, foreach and fused cores:

* ``"kernel"``: the C++ CPU kernel (``ginger_hf.kernel``: float32 and bfloat16), in this module;
* ``"torch"``: the device-resident step (``ginger_hf.device_step``): any device and dtype, no host
  synchronisation; ``"compile"``: the same with its passes compiled by ``torch.compile``;
* ``"reference"``: ``functional.ginger``, the plain oracle (unsharded, no statistics).

``None`` picks the kernel for CPU tensors where it applies, else the device step. The results agree
to rounding (tests/test_fast_step.py, tests/test_exactness.py).

The kernel path, on a refresh step: ``pass 1`` reads ``U, c, g, m`` and forms each block's sums
(``solve.StatsLayout``; float64 accumulation); a tensor whose gradient is not finite is then skipped
untouched, one whose curvature vector alone is not finite steps without its refresh; the small float64
problems of all blocks give the new ``s``, ``R``, ``e`` and pass 2's coefficients (``solve.CoefLayout``);
``pass 2`` writes ``m'``, the parameter and (when the basis gains a direction) ``U - shift v^T`` in place.
Where no tensor is sharded and the blocks are small (rows), the kernel takes the whole step in one call
(``kernel.step``), each block's pass 1, solve and pass 2 back to back while the block is in cache.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from typing import Any

import torch
from torch import Tensor

from . import device_step
from . import functional as F
from . import kernel as _kernel
from .comm import exchange
from .solve import (SOLVE_PARAMS, UPDATE_PARAMS, Blocks, CoefLayout, StatsLayout, counter_params, solve_params,
                    tensor_params, update_params)
from .state_schema import host_counters
from .step_batch import view_of

__all__ = ["ginger", "BACKENDS"]

BACKENDS = (None, "kernel", "compile", "torch", "reference")

_warned_eager: set[str] = set()


def _pick_backend(backend: str | None, p: Tensor, state: dict[str, Any], g: Tensor, c: Tensor | None) -> str:
    if backend is None:
        if p.device.type != "cpu":
            return "torch"
        backend = "kernel"
    if backend == "kernel" and not _kernel.applies(p, state["m"], state["U"], g, c):
        reason = _kernel.why_not(p, state["m"], state["U"], g, c)
        if reason not in _warned_eager:  # the slower path on CPU: say so once (scripts/bench_step.py measures it)
            _warned_eager.add(reason)
            warnings.warn(f"ginger_hf: {reason}; those tensors take the device (torch) step", stacklevel=4)
        return "torch"
    return backend


def ginger(
    params: list[Tensor],
    grads: list[Tensor],
    curvatures: list[Tensor | None],
    states: list[dict[str, Any]],
    hypers: list[F.Hyper],
    *,
    beta1: float,
    backend: str | None = None,
    stats: dict[str, float] | None = None,
    spans: list[bool] | None = None,
    group: Any = None,
    block_lengths: list[int] | None = None,
    gate: Tensor | None = None,
) -> None:
    """One Ginger step for a list of tensors, in place; see ``functional.ginger`` for the contract.

    ``backend`` forces an implementation (tests run each on CPU). With ``stats`` (a dict), adds the step's
    sums for ``ginger_hf.stats``: ``update_sq``, ``span_sq`` (the part of the update in ``span(U)``),
    ``grad_sq``, ``clipped``, ``numel``.

    For sharded tensors (``ginger_hf.sharding``) ``params`` and the states are each rank's slices; the
    blocks of tensors with ``spans[i]`` lie across the ranks of ``group``, whose pass-1 sums (and every
    tensor's finiteness flags) ``comm.exchange`` completes; ``block_lengths`` gives each tensor's
    whole block length (the scale of relative damping). ``gate``: see ``device_step.ginger``.
    """
    if backend not in BACKENDS:
        raise ValueError(f"ginger: backend must be one of {BACKENDS}, got {backend!r}")
    if not params:
        return
    if backend == "reference":
        if group is not None or stats is not None:
            raise ValueError("ginger: backend='reference' takes neither sharded tensors nor stats")
        F.ginger(params, grads, curvatures, states, hypers, beta1=beta1)
        return
    picked = [_pick_backend(backend, p, st, g, c) for p, g, c, st in zip(params, grads, curvatures, states)]
    for on_kernel, run in ((True, _kernel_step), (False, device_step.ginger)):
        idx = [i for i, b in enumerate(picked) if (b == "kernel") == on_kernel]
        if not idx:
            continue
        pick = lambda xs: None if xs is None else [xs[i] for i in idx]  # noqa: E731
        extra = {} if on_kernel else dict(compiled=backend == "compile", gate=gate)
        run(pick(params), pick(grads), pick(curvatures), pick(states), pick(hypers), beta1=beta1, stats=stats,
            spans=pick(spans), group=group, block_lengths=pick(block_lengths), **extra)


def _kernel_step(params, grads, curvatures, states, hypers, *, beta1, stats, spans, group, block_lengths) -> None:
    """The C++ kernel's step: the whole step in one call where it can, else two passes around the batched solve."""
    w1 = 1 - beta1
    for st in states:
        host_counters(st)
    views = [view_of(p, g, c, st, "kernel") for p, g, c, st in zip(params, grads, curvatures, states)]
    layouts = {t.n: StatsLayout(t.n) for t in views}
    lengths = [t.k for t in views] if block_lengths is None else block_lengths
    if group is None and _kernel.takes_whole_step(views, states):
        _whole_step(views, states, hypers, layouts, beta1, lengths, stats)
        return
    sums = _pass1(views, w1, layouts)
    sums, applied, refresh = _decide(views, states, sums, layouts, spans, group)
    coefs, rotate = _solve(views, states, hypers, sums, applied, refresh, layouts, beta1, lengths, stats)
    clipped = _pass2(views, coefs, rotate, applied, w1, count_clipped=stats is not None)
    if stats is not None:
        stats["clipped"] = stats.get("clipped", 0) + clipped
        stats["numel"] = stats.get("numel", 0) + sum(p.numel() for p, ok in zip(params, applied) if ok)


def _whole_step(views, states, hypers, layouts, beta1: float, lengths, stats) -> None:
    """The step as one kernel call per dtype pair and rank (``kernel.step``): each block's two passes and solve
    at once, while the block is in cache. The kernel takes ``_decide``'s decisions itself, from the inputs."""
    jobs = []
    for t, st, h, k in zip(views, states, hypers, lengths):
        q, n = st["curvature_steps"], st["step"] + 1  # the counters once the tensor steps (and refreshes)
        x = tensor_params(h, k, t.U.dtype)
        row = {**x, **counter_params(x, n, q + 1, beta1), **update_params(h),
               "debias_keep": counter_params(x, n, q, beta1)["debias"]}
        jobs.append((t, st, row))
    results, finite, clipped = _kernel.step(jobs, 1 - beta1, layouts, {n: CoefLayout(n) for n in layouts})
    for t, st, (g_ok, c_ok) in zip(views, states, finite):  # the counters, as _decide keeps them
        if not g_ok:
            st["skipped"] += 1
            continue
        st["step"] += 1
        st["curvature_steps"] += t.c is not None and c_ok
        st["curvature_skipped"] += t.c is not None and not c_ok
    if stats is not None:
        applied = [r for r, (ok, _) in zip(results, finite) if ok]
        total = torch.cat(applied).sum(0).tolist() if applied else [0.0] * 3
        for key, value in zip(("update_sq", "span_sq", "grad_sq"), total):
            stats[key] = stats.get(key, 0.0) + value
        stats["clipped"] = stats.get("clipped", 0) + clipped
        stats["numel"] = stats.get("numel", 0) + sum(t.p.numel() for t, (ok, _) in zip(views, finite) if ok)


def _pass1(views, w1: float, layouts) -> list[Tensor]:
    """Every block's sums (reads only), one kernel call per dtype pair and rank."""
    slots: list[list[Tensor | None]] = [[None] for _ in views]
    _kernel.pass1(list(zip(views, slots)), w1, layouts)  # the kernel fills the slots
    return [slot[0] for slot in slots]


def _decide(views, states, sums, layouts, spans, group):
    """Which tensors step (finite gradient) and which refresh (and a finite curvature vector).

    One decision for all tensors (and, sharded, all ranks), on the host (CPU tensors). Updates the counters.
    """
    bad = _non_finite_counts(views, sums, layouts)
    if group is not None:
        exchange(sums, bad, spans, group)
    applied, refresh = [], []
    for t, st, (ok, c_ok) in zip(views, states, (bad == 0).tolist()):
        fresh = ok and t.c is not None and c_ok
        if ok and t.c is not None and not c_ok:
            st["curvature_skipped"] += 1
        if ok:
            st["step"] += 1
            st["curvature_steps"] += fresh
        else:
            st["skipped"] += 1
        applied.append(ok)
        refresh.append(fresh)
    return sums, applied, refresh


def _non_finite_counts(views, sums, layouts) -> Tensor:
    """``(N, 2)`` float64: per tensor, how many of its blocks have a non-finite ``m'`` (gradient) and ``c``.

    ``m'.m'`` and ``c.c`` are float64 sums of exact squares: finite iff every element is.
    """
    counts = torch.zeros(len(views), 2, dtype=torch.float64)
    by_rank: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(views):
        by_rank[t.n].append(i)
    for n, idx in by_rank.items():
        S = _stacked([sums[i] for i in idx])
        squares = torch.stack([layouts[n].view(S, "mm"), layouts[n].view(S, "cc")], 1)
        owner = torch.tensor(idx)[_kernel.block_owner(tuple(views[i].B for i in idx))]
        counts.index_add_(0, owner, (~torch.isfinite(squares)).to(torch.float64))
    return counts


def _stacked(parts: list[Tensor]) -> Tensor:
    """``torch.cat(parts)`` of 2-D tensors; a view, not a copy, where they lie back to back in one buffer
    (pass 1's sums and the coefficients of one kernel call)."""
    head = parts[0]
    end = head.data_ptr()
    for x in parts:
        if not x.is_contiguous() or x.data_ptr() != end or x.dtype != head.dtype or x.shape[1:] != head.shape[1:] or (
                x.untyped_storage().data_ptr() != head.untyped_storage().data_ptr()):
            return torch.cat(parts)
        end += x.numel() * x.element_size()
    rows = sum(x.shape[0] for x in parts)
    return head.new_empty(0).set_(head.untyped_storage(), head.storage_offset(), (rows, *head.shape[1:]))


def _solve(views, states, hypers, sums, applied, refresh, layouts, beta1, lengths, stats):
    """The small problems in C++, batched by rank and by refresh/keep: pass 2's coefficients, and the new small state."""
    coefs: list[Tensor | None] = [None] * len(views)
    rotate = [False] * len(views)
    applied_idx = [i for i in range(len(views)) if applied[i]]
    small = {i: [states[i][name] for name in ("s", "R", "e")] for i in applied_idx}
    groups: dict[tuple[int, bool], list[int]] = defaultdict(list)
    for i in applied_idx:
        groups[(views[i].n, refresh[i])].append(i)
    new_small: list[tuple[int, Tensor, Tensor, Tensor]] = []
    new_e: list[tuple[int, Tensor]] = []
    rotations: list[tuple[list[int], Tensor, list[int]]] = []
    for (n, fresh), idx in groups.items():
        layout, clay = layouts[n], CoefLayout(n)
        sizes = [views[i].B for i in idx]
        owner = _kernel.block_owner(tuple(sizes))
        bl = _gather_blocks(idx, views, states, [hypers[i] for i in idx], small, owner, beta1, [lengths[i] for i in idx])
        update = torch.tensor([list(update_params(hypers[i]).values()) for i in idx], dtype=torch.float64)[owner]
        S = _stacked([sums[i] for i in idx])
        out = (_kernel.solve_refresh if fresh else _kernel.solve_keep)(bl, layout, clay, S)
        C = torch.zeros(S.shape[0], clay.width, dtype=torch.float64)
        for name in ("scale", "shrink") + (("along", "v_c", "shift", "v_u") if fresh else ()):
            clay.view(C, name).copy_(out[name])
        for name, column in zip(UPDATE_PARAMS, update.unbind(1)):
            clay.view(C, name).copy_(column)
        if stats is not None:
            _add_stats(stats, out, layout, S)
        for i, piece in zip(idx, C.split(sizes)):
            coefs[i] = piece
        if fresh:
            new_small += zip(idx, *(out[name].split(sizes) for name in ("s", "R", "e")))
            rotations.append((idx, out["rotate"], sizes))
        else:
            new_e += zip(idx, out["e"].split(sizes))
    if new_small or new_e:
        dests = [states[i][name] for i, *_ in new_small for name in ("s", "R", "e")] + [states[i]["e"] for i, _ in new_e]
        torch._foreach_copy_(dests, [x for _, *values in new_small for x in values] + [e for _, e in new_e])
    if rotations:
        flat_idx = [i for idx, _, _ in rotations for i in idx]
        anys = torch.stack([part.any() for _, r, sizes in rotations for part in r.split(sizes)]).tolist()
        for i, flag in zip(flat_idx, anys):
            rotate[i] = flag  # blocks of a tensor that add no direction have shift = 0
    return coefs, rotate


def _pass2(views, coefs, rotate, applied, w1: float, count_clipped: bool) -> int:
    """The momentum, the parameter and (when the basis gains a direction) ``U``; returns coordinates clipped."""
    kernel_jobs = [(t, coefs[i], rotate[i]) for i, t in enumerate(views) if applied[i]]
    count = _kernel.pass2(kernel_jobs, w1, {t.n: CoefLayout(t.n) for t, _, _ in kernel_jobs}) if kernel_jobs else 0
    return count if count_clipped else 0


def _gather_blocks(idx, views, states, hypers, small, owner, beta1, lengths) -> Blocks:
    """The small solve's inputs for tensors ``idx`` (their blocks stacked; ``owner``: each block's place in
    ``idx``), from host copies ``small``."""
    table = torch.tensor([solve_params(h, states[i]["step"], states[i]["curvature_steps"], beta1, k, views[i].U.dtype)
                          for i, h, k in zip(idx, hypers, lengths)], dtype=torch.float64)[owner]
    return Blocks(s=torch.cat([small[i][0] for i in idx]), R=torch.cat([small[i][1] for i in idx]),
                  e=torch.cat([small[i][2] for i in idx]),
                  **{name: column for name, column in zip(SOLVE_PARAMS, table.unbind(1))})


def _add_stats(stats: dict[str, float], out: dict[str, Tensor], layout: StatsLayout, S: Tensor) -> None:
    """``|u|^2``, its part in ``span(U)`` (before clipping) and ``|g|^2``, summed over blocks."""
    for key, value in (("update_sq", out["update_sq"]), ("span_sq", out["span_sq"]), ("grad_sq", layout.view(S, "gg"))):
        stats[key] = stats.get(key, 0.0) + float(value.sum())
