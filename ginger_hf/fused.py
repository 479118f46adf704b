"""A Ginger step in streaming passes over the state: the fast path the optimizer runs.

Same signature and result (to rounding) as ``functional.ginger``, the reference. Per
tensor, split into blocks (rows or the whole tensor), on a refresh step:

1. ``pass 1`` reads ``U, c, g, m`` and writes nothing: with ``m' = lerp(m, g, 1 - beta1)``
   it forms each block's sums (``solve.StatsLayout``: ``U U^T``, ``U c``, ``U m'``, ``c.c``,
   ``c.m'``, ``m'.m'``, ``g.g``; float64 accumulation). A tensor whose gradient is not finite
   is then skipped untouched; one whose curvature vector alone is not finite steps
   without its refresh.
2. ``solve`` (``ginger_hf.solve``): the small float64 problems of all blocks of one rank at
   once give the new ``s``, ``R``, ``e`` and pass 2's coefficients (``solve.CoefLayout``).
3. ``pass 2`` reads ``U, c, g, m`` and the parameter, and writes ``m'``, the parameter and
   (when the basis gains a direction) ``U - shift v^T`` in place.

Between refreshes pass 1 forms only ``U m'`` (no Gram, no ``c``), and pass 2 leaves ``U``.
Nothing of size ``n * d`` is allocated.

The blocks are independent once the decisions are taken, so where all tensors run on the C++
kernel, none is sharded and the blocks are small (rows), the kernel takes the whole step in one
call (``kernel.step``): it checks the inputs for non-finite numbers first, then runs each
block's pass 1, solve and pass 2 back to back while the block is in cache. Its result is the
two-pass result to rounding (a block split between threads there sums in another order).

Backends run the passes: ``"kernel"`` (the C++ CPU kernel, ``ginger_hf.kernel``: float32 and
bfloat16), ``"compile"`` (``torch.compile`` of whole-tensor expressions, fused kernels on
GPUs) and ``"torch"`` (eager torch over bounded chunks; any device and dtype). ``None``
picks the kernel where it applies on CPU, ``compile`` on CUDA, else ``torch``.
"""

from __future__ import annotations

import math
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import kernel as _kernel
from .functional import Hyper, block_shape
from .solve import SOLVE_PARAMS, Blocks, CoefLayout, StatsLayout, solve_keep, solve_params, solve_refresh

__all__ = ["ginger", "BACKENDS"]

BACKENDS = (None, "kernel", "compile", "torch")

# Elements per chunk of the eager torch passes (temporaries are about (n + 4) * chunk float64).
_TORCH_CHUNK = {"cpu": 1 << 16}
_TORCH_CHUNK_DEFAULT = 1 << 22


@dataclass
class _Tensor:
    """One tensor's views for the passes: ``U (n, B, k)``, ``m``, ``g``, ``c``, ``p`` as ``(B, k)``."""

    U: Tensor
    m: Tensor
    g: Tensor
    c: Tensor | None
    p: Tensor
    backend: str

    @property
    def n(self) -> int:
        return self.U.shape[0]

    @property
    def B(self) -> int:
        return self.U.shape[1]

    @property
    def k(self) -> int:
        return self.U.shape[2]


# -- eager torch passes --------------------------------------------------------------------


def _chunks(t: _Tensor):
    """Row ranges and column ranges that keep a chunk near ``_TORCH_CHUNK`` elements."""
    size = _TORCH_CHUNK.get(t.U.device.type, _TORCH_CHUNK_DEFAULT)
    rows = max(1, size // max(t.k, 1))
    cols = min(t.k, size) or 1
    for b0 in range(0, t.B, rows):
        for k0 in range(0, max(t.k, 1), cols):
            yield slice(b0, min(t.B, b0 + rows)), slice(k0, min(t.k, k0 + cols))


def _pass1_torch(t: _Tensor, w1: float, layout: StatsLayout, out: Tensor) -> None:
    """Adds each block's sums to ``out`` ``(B, width)`` float64 (on ``t``'s device). Reads only."""
    refresh = t.c is not None
    for rows, cols in _chunks(t):
        U = t.U[:, rows, cols].double()
        m = torch.lerp(t.m[rows, cols], t.g[rows, cols].to(t.m.dtype), w1).double()
        g = t.g[rows, cols].double()
        o = out[rows]
        layout.view(o, "um").add_(torch.einsum("ibk,bk->bi", U, m))
        layout.view(o, "mm").add_((m * m).sum(-1))
        layout.view(o, "gg").add_((g * g).sum(-1))
        if refresh:
            c = t.c[rows, cols].double()
            layout.view(o, "gram").add_(torch.einsum("ibk,jbk->bij", U, U))
            layout.view(o, "uc").add_(torch.einsum("ibk,bk->bi", U, c))
            layout.view(o, "cc").add_((c * c).sum(-1))
            layout.view(o, "cm").add_((c * m).sum(-1))


def _pass2_torch(t: _Tensor, w1: float, lay: CoefLayout, coefs: Tensor, rotate: bool, clipped: Tensor | None) -> None:
    """``m <- m'``, ``p <- p * decay - lr * clip(u)``, and on ``rotate`` ``U <- U - shift v^T``; in place."""
    dt = t.m.dtype
    scale, along, lr = lay.view(coefs, "scale").to(dt), lay.view(coefs, "along").to(dt), lay.view(coefs, "lr").to(dt)
    decay, rho, v_c = lay.view(coefs, "decay").to(dt), lay.view(coefs, "rho"), lay.view(coefs, "v_c").to(dt)
    a, shift, v_u = (lay.view(coefs, name).to(dt) for name in ("shrink", "shift", "v_u"))
    for rows, cols in _chunks(t):
        U = t.U[:, rows, cols]
        m = t.m[rows, cols]
        m.lerp_(t.g[rows, cols].to(dt), w1)
        u = m - torch.einsum("ibk,bi->bk", U, a[rows])
        if rotate:
            v = torch.einsum("ibk,bi->bk", U, v_u[rows]) + v_c[rows, None] * t.c[rows, cols].to(dt)
            u += along[rows, None] * v
        u *= scale[rows, None]
        r = rho[rows, None].to(dt)
        if clipped is not None:
            clipped += (u.abs() > r).sum()
        u = torch.minimum(torch.maximum(u, -r), r)
        p = t.p[rows, cols]
        p.copy_(p * decay[rows, None].to(p.dtype) - lr[rows, None].to(p.dtype) * u.to(p.dtype))
        if rotate:
            U.sub_(shift[rows].T[:, :, None] * v[None])


# -- whole-tensor passes for torch.compile (the GPU path) ---------------------------------------


def _pass1_whole(U: Tensor, m: Tensor, g: Tensor, c: Tensor | None, w1: float) -> tuple[Tensor, ...]:
    """Pass 1's sums of every block as whole-tensor expressions; compiled, fused reductions."""
    mv = torch.lerp(m, g.to(m.dtype), w1).double()
    Ud, gd = U.double(), g.double()
    um, mm, gg = torch.einsum("ibk,bk->bi", Ud, mv), (mv * mv).sum(-1), (gd * gd).sum(-1)
    if c is None:
        return um, mm, gg
    cd = c.double()
    return (um, mm, gg, torch.einsum("ibk,jbk->bij", Ud, Ud), torch.einsum("ibk,bk->bi", Ud, cd),
            (cd * cd).sum(-1), (cd * mv).sum(-1))


def _pass2_whole(U: Tensor, m: Tensor, g: Tensor, p: Tensor, c: Tensor | None, w1: float, scale: Tensor,
                 along: Tensor, lr: Tensor, decay: Tensor, rho: Tensor, v_c: Tensor, a: Tensor, shift: Tensor,
                 v_u: Tensor) -> None:
    dt = m.dtype
    mv = torch.lerp(m, g.to(dt), w1)
    u = mv - (a.T.to(dt)[:, :, None] * U).sum(0)
    if c is not None:
        v = (v_u.T.to(dt)[:, :, None] * U).sum(0) + v_c.to(dt)[:, None] * c.to(dt)
        u = u + along.to(dt)[:, None] * v
    r = rho.to(dt)[:, None]
    u = torch.minimum(torch.maximum(u * scale.to(dt)[:, None], -r), r)
    p.copy_(p * decay.to(p.dtype)[:, None] - lr.to(p.dtype)[:, None] * u.to(p.dtype))
    m.copy_(mv)
    if c is not None:
        U.sub_(shift.T.to(dt)[:, :, None] * v[None])


_compiled: dict[str, Any] = {}
_compile_failed = False


def _run_compiled(fn, *args):
    """``torch.compile(fn)(*args)``; ``NotImplemented`` (warned once) where compiling fails, e.g. no Triton."""
    global _compile_failed
    if _compile_failed:
        return NotImplemented
    if fn.__name__ not in _compiled:
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True)
    try:
        return _compiled[fn.__name__](*args)
    except (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported) as exc:  # before any write
        _compile_failed = True
        warnings.warn(f"ginger_hf: torch.compile of the Ginger passes failed ({type(exc).__name__}); "
                      "using eager torch passes")
        return NotImplemented


def _pass1_compiled(t: _Tensor, w1: float, layout: StatsLayout, out: Tensor) -> bool:
    sums = _run_compiled(_pass1_whole, t.U, t.m, t.g, t.c, w1)
    if sums is NotImplemented:
        return False
    for name, value in zip(("um", "mm", "gg", "gram", "uc", "cc", "cm"), sums):
        layout.view(out, name).copy_(value)
    return True


def _pass2_compiled(t: _Tensor, w1: float, lay: CoefLayout, coefs: Tensor, rotate: bool) -> bool:
    args = [lay.view(coefs, name) for name in ("scale", "along", "lr", "decay", "rho", "v_c", "shrink", "shift", "v_u")]
    return _run_compiled(_pass2_whole, t.U, t.m, t.g, t.p, t.c if rotate else None, w1, *args) is not NotImplemented


# -- the step -------------------------------------------------------------------------------


_warned_eager: set[str] = set()


def _pick_backend(backend: str | None, p: Tensor, state: dict[str, Any], g: Tensor, c: Tensor | None) -> str:
    if backend is None:
        if p.device.type == "cuda":
            return "compile"
        backend = "kernel"
    if backend == "kernel" and not _kernel.applies(p, state["m"], state["U"], g, c):
        reason = _kernel.why_not(p, state["m"], state["U"], g, c)
        if reason not in _warned_eager:  # the slow path: say so once (scripts/bench_step.py measures it)
            _warned_eager.add(reason)
            warnings.warn(f"ginger_hf: {reason}; those tensors take the eager torch passes (slower)", stacklevel=4)
        return "torch"
    return backend


def _flat(x: Tensor, B: int, k: int) -> Tensor:
    return (x if x.is_contiguous() else x.contiguous()).view(B, k)


def _to_host(tensors: list[Tensor]) -> list[Tensor]:
    """Host copies of small tensors, one transfer per device (CPU tensors are returned as they are)."""
    out: list[Tensor | None] = [None] * len(tensors)
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        if t.device.type == "cpu":
            out[i] = t
        else:
            by_device[t.device].append(i)
    for idx in by_device.values():
        flat = torch.cat([tensors[i].reshape(-1).to(torch.float64) for i in idx]).cpu()
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx])):
            out[i] = piece.view(tensors[i].shape)
    return out


def _copy_to(dests: list[Tensor], values: list[Tensor]) -> None:
    """``dest.copy_(value)`` for host values, one transfer per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, d in enumerate(dests):
        by_device[d.device].append(i)
    for dev, idx in by_device.items():
        if dev.type == "cpu":
            torch._foreach_copy_([dests[i] for i in idx], [values[i] for i in idx])
            continue
        flat = torch.cat([values[i].reshape(-1) for i in idx]).to(dev)
        torch._foreach_copy_([dests[i] for i in idx], [x.view(dests[i].shape) for i, x in
                                                         zip(idx, flat.split([values[i].numel() for i in idx]))])


def ginger(
    params: list[Tensor],
    grads: list[Tensor],
    curvatures: list[Tensor | None],
    states: list[dict[str, Any]],
    hypers: list[Hyper],
    *,
    beta1: float,
    backend: str | None = None,
    stats: dict[str, float] | None = None,
    sync: Callable[[list[Tensor], Tensor], tuple[list[Tensor], Tensor]] | None = None,
    block_lengths: list[int] | None = None,
) -> None:
    """One Ginger step for a list of tensors, in place; see ``functional.ginger`` for the contract.

    ``backend`` forces the passes' implementation (tests run every backend on CPU). With
    ``stats`` (a dict), adds the step's sums for ``ginger_hf.stats``: ``update_sq``,
    ``span_sq`` (the part of the update in ``span(U)``), ``grad_sq``, ``clipped``, ``numel``.
    Host synchronisations do not grow with the number of tensors: the sums come to the host
    in one transfer per device, and the decisions are taken there together.

    For sharded tensors (``ginger_hf.sharding``) ``params`` and the states are each rank's
    slices; ``sync(sums, flags)`` completes the pass-1 sums of blocks that span ranks and the
    per-tensor counts of non-finite inputs (``flags``, ``(N, 2)``), and ``block_lengths``
    gives each tensor's whole block length (the scale of relative damping).
    """
    if backend not in BACKENDS:
        raise ValueError(f"ginger: backend must be one of {BACKENDS}, got {backend!r}")
    if not params:
        return
    w1 = 1 - beta1
    views = [_view(p, g, c, st, backend) for p, g, c, st in zip(params, grads, curvatures, states)]
    layouts = {t.n: StatsLayout(t.n) for t in views}
    lengths = [t.k for t in views] if block_lengths is None else block_lengths
    if sync is None and _kernel.takes_whole_step(views, states):
        _whole_step(views, states, hypers, layouts, beta1, lengths, stats)
        return
    sums = _pass1(views, w1, layouts)
    sums, applied, refresh = _decide(views, states, sums, layouts, sync)
    coefs, rotate = _solve(views, states, hypers, sums, applied, refresh, layouts, beta1, lengths, stats)
    clipped = _pass2(views, coefs, rotate, applied, w1, count_clipped=stats is not None)
    if stats is not None:
        stats["clipped"] = stats.get("clipped", 0) + clipped
        stats["numel"] = stats.get("numel", 0) + sum(p.numel() for p, ok in zip(params, applied) if ok)


def _view(p: Tensor, g: Tensor, c: Tensor | None, st: dict[str, Any], backend: str | None) -> _Tensor:
    B, n = st["s"].shape[0], st["U"].shape[0]
    k = p.numel() // B if B else 0
    return _Tensor(U=st["U"].view(n, B, k), m=st["m"].view(B, k), g=_flat(g, B, k),
                   c=None if c is None else _flat(c, B, k), p=p.view(B, k), backend=_pick_backend(backend, p, st, g, c))


def _whole_step(views, states, hypers, layouts, beta1: float, lengths, stats) -> None:
    """The step as one kernel call per dtype pair and rank (``kernel.step``): each block's two passes and solve
    at once, while the block is in cache. The kernel takes ``_decide``'s decisions itself, from the inputs."""
    jobs = []
    for t, st, h, k in zip(views, states, hypers, lengths):
        q, n = st["curvature_steps"], st["step"] + 1  # the counters once the tensor steps (and refreshes)
        row = dict(zip(SOLVE_PARAMS, solve_params(h, n, q + 1, beta1, k, t.U.dtype)), **_update_params(h))
        row["debias_keep"] = solve_params(h, n, q, beta1, k, t.U.dtype)[SOLVE_PARAMS.index("debias")]
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


def _pass1(views: list[_Tensor], w1: float, layouts) -> list[Tensor]:
    """Every block's sums (reads only), on each tensor's device."""
    slots: list[list[Tensor | None]] = [[None] for _ in views]
    kernel_jobs = []
    for t, slot in zip(views, slots):
        if t.backend == "kernel":
            kernel_jobs.append((t, slot))  # the kernel fills the slot
            continue
        out = slot[0] = torch.zeros(t.B, layouts[t.n].width, dtype=torch.float64, device=t.U.device)
        if not (t.backend == "compile" and _pass1_compiled(t, w1, layouts[t.n], out)):
            _pass1_torch(t, w1, layouts[t.n], out)
    if kernel_jobs:
        _kernel.pass1(kernel_jobs, w1, layouts)
    return [slot[0] for slot in slots]


def _decide(views, states, sums, layouts, sync):
    """Which tensors step (finite gradient) and which refresh (and a finite curvature vector).

    One decision for all tensors (and, sharded, all ranks); the sums come to the host in one
    transfer per device. Updates the counters.
    """
    bad = _non_finite_counts(views, sums, layouts)
    if sync is not None:
        sums, bad = sync(sums, bad)
    sums = _to_host(sums)
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
    devices = {s.device for s in sums}
    if len(devices) > 1:  # tensors on several devices: one small reduction each
        return torch.stack([_non_finite_counts([t], [s], layouts).to("cpu") for t, s in zip(views, sums)])[:, 0]
    device = devices.pop()
    counts = torch.zeros(len(views), 2, dtype=torch.float64, device=device)
    by_rank: dict[int, list[int]] = defaultdict(list)
    for i, t in enumerate(views):
        by_rank[t.n].append(i)
    for n, idx in by_rank.items():
        S = _stacked([sums[i] for i in idx])
        squares = torch.stack([layouts[n].view(S, "mm"), layouts[n].view(S, "cc")], 1)
        owner = torch.tensor(idx, device=device)[_kernel.block_owner(tuple(views[i].B for i in idx)).to(device)]
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
    """The small problems, batched by rank and by refresh/keep: pass 2's coefficients, and the new small state."""
    coefs: list[Tensor | None] = [None] * len(views)
    rotate = [False] * len(views)
    applied_idx = [i for i in range(len(views)) if applied[i]]
    host = _to_host([x for i in applied_idx for x in (states[i]["s"], states[i]["R"], states[i]["e"])])
    small = {i: host[3 * j : 3 * j + 3] for j, i in enumerate(applied_idx)}
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
        lr, decay, rho = torch.tensor([list(_update_params(hypers[i]).values()) for i in idx],
                                      dtype=torch.float64)[owner].unbind(1)
        S = _stacked([sums[i] for i in idx])
        on_cpu = all(views[i].backend == "kernel" for i in idx)
        if not fresh:
            out = _kernel.solve_keep(bl, layout, clay, S) if on_cpu else solve_keep(bl, layout, S)
        else:
            out = _kernel.solve_refresh(bl, layout, clay, S) if on_cpu else solve_refresh(bl, layout, S)
        C = torch.zeros(S.shape[0], clay.width, dtype=torch.float64)
        for name in ("scale", "shrink") + (("along", "v_c", "shift", "v_u") if fresh else ()):
            clay.view(C, name).copy_(out[name])
        clay.view(C, "lr").copy_(lr)
        clay.view(C, "decay").copy_(decay)
        clay.view(C, "rho").copy_(rho)
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
        _copy_to(dests, [x for _, *values in new_small for x in values] + [e for _, e in new_e])
    if rotations:
        flat_idx = [i for idx, _, _ in rotations for i in idx]
        anys = torch.stack([part.any() for _, r, sizes in rotations for part in r.split(sizes)]).tolist()
        for i, flag in zip(flat_idx, anys):
            rotate[i] = flag  # blocks of a tensor that add no direction have shift = 0
    return coefs, rotate


def _pass2(views, coefs, rotate, applied, w1: float, count_clipped: bool) -> int:
    """The momentum, the parameter and (when the basis gains a direction) ``U``; returns coordinates clipped."""
    clipped = torch.zeros((), dtype=torch.int64)
    on_device = _coefs_to_devices(views, coefs, applied)
    kernel_jobs = []
    for i, t in enumerate(views):
        if not applied[i]:
            continue
        clay = CoefLayout(t.n)
        if t.backend == "kernel":
            kernel_jobs.append((t, coefs[i], rotate[i]))
        elif not (t.backend == "compile" and not count_clipped and _pass2_compiled(t, w1, clay, on_device[i], rotate[i])):
            _pass2_torch(t, w1, clay, on_device[i], rotate[i], clipped if count_clipped else None)
    count = _kernel.pass2(kernel_jobs, w1, {t.n: CoefLayout(t.n) for t, _, _ in kernel_jobs}) if kernel_jobs else 0
    return int(clipped) + count if count_clipped else 0


def _coefs_to_devices(views, coefs, applied) -> list[Tensor | None]:
    """Each applied tensor's coefficient rows on its device (one transfer per device)."""
    idx = [i for i, ok in enumerate(applied) if ok and views[i].U.device.type != "cpu"]
    out = [c if c is not None and views[i].U.device.type == "cpu" else None for i, c in enumerate(coefs)]
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i in idx:
        by_device[views[i].U.device].append(i)
    for dev, ids in by_device.items():
        flat = torch.cat([coefs[i].reshape(-1) for i in ids]).to(dev)
        for i, piece in zip(ids, flat.split([coefs[i].numel() for i in ids])):
            out[i] = piece.view(coefs[i].shape)
    return out


def _update_params(h: Hyper) -> dict[str, float]:
    """Pass 2's per-tensor coefficients: lr, decay (``1 - lr * weight_decay``), rho."""
    return dict(lr=h.lr, decay=1 - h.lr * h.weight_decay, rho=math.inf if h.rho is None else h.rho)


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
