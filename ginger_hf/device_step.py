"""The device-resident Ginger step: passes, decisions, small solves and state updates on the parameter's device.

Same contract as ``functional.ginger`` (the reference); the C++ kernel (``ginger_hf.kernel``) is its CPU
sibling. Nothing in a step waits for the device: no ``.item()``, ``.tolist()``, ``bool(tensor)`` or
device-to-host copy. Decisions are masks: a tensor whose gradient is not finite is written back unchanged
through ``torch.where``, one whose curvature vector alone is not finite takes the keep step's values. The
counters that follow those decisions are 0-d tensors on the device (``state_schema``); which tensors get a
curvature vector is decided on the host by the schedule's clock. The host sends small per-tensor tables
to the device (non-blocking copies, no synchronisation).

Per device, the blocks of all tensors of one rank ``n`` are solved together: pass 1 writes every block's
sums into one buffer per ``(n, refresh)`` group, the small float64 problems of the group run as one batch
(``ginger_hf.solve``, Jacobi eigen-solves in ``ginger_hf.symeig``), and pass 2 reads its coefficient rows
from one buffer. The passes run per pack of tensors (off the CPU, small tensors of one signature are copied
side by side and take each pass together, so that a step's launches grow with the packs, not the tensors;
larger tensors and CPU tensors run alone), in bounded chunks (eager) or as whole-tensor expressions
(``compiled=True``: ``torch.compile``, fused kernels on GPUs).

Precision: the small problems run in float64 on every device, the precision the dense-reference tests
hold them to. They cost O(B n^3) per refresh (by count, some 4 GFLOP for T5-small's 99,808 row blocks
at tau 4, most of it the Jacobi sweeps): little on a data-centre GPU (an H200 runs a refresh's whole
CUDA work in about 43 ms, memory- and launch-bound; ``docs/performance.md`` 28); at a consumer GPU's
1/64-rate float64 it may show (not measured).
float32 would lose the in-span test's resolution (``solve.in_span_tolerance``: 1e-7 of ``|c|``).

With ``stats`` (opt-in), the step's sums come to the host at the end: that reads the device (a sync).
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor

from .comm import exchange
from .solve import (SOLVE_PARAMS, UPDATE_PARAMS, Blocks, CoefLayout, StatsLayout, counter_params, solve_keep,
                    solve_refresh, tensor_params, update_params)
from .functional import Hyper
from .state_schema import device_counters
from .step_batch import TensorView, view_of

__all__ = ["ginger"]

# Elements per chunk of the eager passes (temporaries are about (n + 4) * chunk float64).
_CHUNK = {"cpu": 1 << 16}
_CHUNK_DEFAULT = 1 << 22
# Off the CPU, small tensors of one signature (rank, block length, dtypes) run their passes as one pack, copied
# together: a pass's launches then grow with the packs, not the tensors. Larger tensors run alone, uncopied.
_PACK_TENSOR = 1 << 20  # elements: a tensor up to this joins a pack
_PACK_TOTAL = 1 << 22  # elements per pack (its copies are the temporaries)
_UNPACKED = {"cpu"}  # devices whose tensors never pack: copies cost more there than the ops they save
_SUMS = ("um", "mm", "gg", "gram", "uc", "cc", "cm")  # pass 1's sums, in _pass1_rows's order
_REFRESH_COEFS = ("along", "v_c", "shift", "v_u")  # zero on a keep step


def _chunks(t: TensorView):
    """``(start, length)`` of row ranges and column ranges that keep a chunk near ``_CHUNK`` elements."""
    size = _CHUNK.get(t.U.device.type, _CHUNK_DEFAULT)
    rows = max(1, size // max(t.k, 1))
    cols = min(t.k, size) or 1
    for b0 in range(0, t.B, rows):
        for k0 in range(0, max(t.k, 1), cols):
            yield (b0, min(t.B, b0 + rows) - b0), (k0, min(t.k, k0 + cols) - k0)


def _piece(x: Tensor, rows: tuple[int, int], cols: tuple[int, int]) -> Tensor:
    """A chunk of a ``(B, k)`` (or ``(n, B, k)``) view: ``narrow``, not indexing, which fake devices refuse."""
    return x.narrow(-2, *rows).narrow(-1, *cols)


def _col(x: Tensor) -> Tensor:
    return x.unsqueeze(-1)


def _copy(dests, values) -> None:
    """``dest.copy_(value)`` for each pair, as one foreach op (``Tensor.copy_`` also fails on fake devices)."""
    torch._foreach_copy_(list(dests), list(values))


def _pass1_rows(U: Tensor, m: Tensor, g: Tensor, c: Tensor | None, w1: float) -> tuple[Tensor, ...]:
    """Pass 1's sums (``_SUMS``) of blocks ``(B, k)``, float64; reads only.

    ``U . x`` is a broadcast product and a sum, not a batched GEMV: on an H200 that is 2.6x faster over a
    ``4 x 8192 x 512`` float32 ``U`` (``docs/performance.md``, 28), and a keep step casts no copy of ``U``."""
    mv = torch.lerp(m, g.to(m.dtype), w1).double()
    gd = g.double()
    um, mm, gg = (U * mv).sum(-1).T, (mv * mv).sum(-1), (gd * gd).sum(-1)
    if c is None:
        return um, mm, gg
    Ud, cd = U.double(), c.double()
    return (um, mm, gg, torch.einsum("ibk,jbk->bij", Ud, Ud), (U * cd).sum(-1).T, (cd * cd).sum(-1),
            (cd * mv).sum(-1))


def _pass2_rows(U: Tensor, m: Tensor, g: Tensor, p: Tensor, c: Tensor | None, w1: float, ok: Tensor,
                fresh: Tensor | None, coefs: Tensor) -> Tensor:
    """``m <- m'``, ``p <- p * decay - lr * clip(u)`` where ``ok``, ``U <- U - shift v^T`` where ``fresh``; in place.

    ``coefs``: the blocks' rows of ``solve.CoefLayout``. Returns how many coordinates the clip cut (a device tensor)."""
    dt = m.dtype
    clay = CoefLayout(U.shape[0])
    in_state = coefs.to(dt)  # one cast of the rows, not one per coefficient
    scale, along, rho, v_c, a, shift, v_u = (clay.view(in_state, name)
                                             for name in ("scale", "along", "rho", "v_c", "shrink", "shift", "v_u"))
    in_param = in_state if p.dtype == dt else coefs.to(p.dtype)
    lr, decay = clay.view(in_param, "lr"), clay.view(in_param, "decay")
    mv = torch.lerp(m, g.to(dt), w1)
    u = mv - torch.einsum("ibk,bi->bk", U, a)
    if c is not None:
        c = torch.where(_col(fresh), c.to(dt), 0)  # a refused (non-finite) vector is never read
        v = torch.einsum("ibk,bi->bk", U, v_u) + _col(v_c) * c
        u = u + _col(along) * v
    u = u * _col(scale)
    r = _col(rho)
    keep = _col(ok)
    clipped = ((u.abs() > r) & keep).sum()
    u = torch.minimum(torch.maximum(u, -r), r)
    writes = [(p, torch.where(keep, p * _col(decay) - _col(lr) * u.to(p.dtype), p)), (m, torch.where(keep, mv, m))]
    if c is not None:
        moved = U - _col(shift.T) * v.unsqueeze(0)
        writes.append((U, torch.where(_col(fresh).unsqueeze(0), moved, U)))
    _copy(*zip(*writes))
    return clipped


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
        last = " | ".join([line.strip() for line in str(exc).splitlines() if line.strip()][-3:])[-400:]
        warnings.warn(f"ginger_hf: torch.compile of the Ginger passes failed ({type(exc).__name__}: {last}); "
                      "using eager torch passes")
        return NotImplemented


def _pass1(t: TensorView, w1: float, layout: StatsLayout, out: Tensor, compiled: bool) -> None:
    """Adds each block's sums to ``out`` ``(B, width)``."""
    if compiled:
        sums = _run_compiled(_pass1_rows, t.U, t.m, t.g, t.c, w1)
        if sums is not NotImplemented:
            for name, value in zip(_SUMS, sums):
                _copy([layout.view(out, name)], [value])
            return
    for rows, cols in _chunks(t):
        U, m, g, c = (None if x is None else _piece(x, rows, cols) for x in (t.U, t.m, t.g, t.c))
        o = out.narrow(0, *rows)
        for name, value in zip(_SUMS, _pass1_rows(U, m, g, c, w1)):
            layout.view(o, name).add_(value)


def _pass2(t: TensorView, w1: float, coefs: Tensor, ok: Tensor, fresh: Tensor | None, compiled: bool) -> Tensor:
    if compiled:
        clipped = _run_compiled(_pass2_rows, t.U, t.m, t.g, t.p, t.c, w1, ok, fresh, coefs)
        if clipped is not NotImplemented:
            return clipped
    clipped = torch.zeros((), dtype=torch.int64, device=t.U.device)
    for rows, cols in _chunks(t):
        U, m, g, p, c = (None if x is None else _piece(x, rows, cols) for x in (t.U, t.m, t.g, t.p, t.c))
        clipped += _pass2_rows(U, m, g, p, c, w1, ok.narrow(0, *rows), None if fresh is None else fresh.narrow(0, *rows),
                               coefs.narrow(0, *rows))
    return clipped


def _signature(t: TensorView) -> tuple:
    return (t.k, t.U.dtype, t.m.dtype, t.g.dtype, t.p.dtype, None if t.c is None else t.c.dtype)


def _packs(views: list[TensorView], idx: list[int]) -> list[list[int]]:
    """``idx`` (sorted by signature) cut into runs that take their passes together (``_PACK_*``)."""
    packs, run, total = [], [], 0
    for i in idx:
        t = views[i]
        size = t.B * t.k
        small = size <= _PACK_TENSOR and t.U.device.type not in _UNPACKED
        if run and small and _signature(t) == _signature(views[run[0]]) and total + size <= _PACK_TOTAL:
            run.append(i)
            total += size
            continue
        if run:
            packs.append(run)
        run, total = ([i], size) if small else ([], 0)
        if not small:
            packs.append([i])
    return packs + ([run] if run else [])


def _packed(vs: list[TensorView], writes: bool) -> TensorView:
    """One view over a pack's tensors, their blocks one after the other (copies, unless the pack is one tensor).
    Pass 1 (``writes=False``) reads no parameter: its pack has no ``p``."""
    if len(vs) == 1:
        return vs[0]
    cat = lambda name, dim=0: torch.cat([getattr(v, name) for v in vs], dim)  # noqa: E731
    return TensorView(U=cat("U", 1), m=cat("m"), g=cat("g"), c=None if vs[0].c is None else cat("c"),
                      p=cat("p") if writes else None, backend=vs[0].backend)


def _unpack(t: TensorView, vs: list[TensorView]) -> None:
    """Pass 2's writes to a pack's copies, back to its tensors (one foreach copy)."""
    if len(vs) == 1:
        return
    sizes = [v.B for v in vs]
    dests = [v.m for v in vs] + [v.p for v in vs]
    values = [*t.m.split(sizes), *t.p.split(sizes)]
    if t.c is not None:
        dests += [v.U for v in vs]
        values += t.U.split(sizes, 1)
    _copy(dests, values)


def _to_device(values: list, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small host-built table (a list, or a list of rows) on ``device`` without waiting for the device (a blocking
    copy from the host would). On CUDA: an asynchronous copy from pinned memory (torch's pinned-memory cache holds
    the buffer until the copy has run). Elsewhere, a fake CUDA device included: zeros plus one foreach add whose
    scalars travel as kernel arguments (one view and one scalar per entry; for the step's table of about 2,000,
    8.8 ms of host time on CPU tensors, against 0.2 ms for ``torch.tensor``). On CPU the host tensor is the table."""
    if device.type == "cpu":
        return torch.tensor(values, dtype=dtype)
    if device.type == "cuda" and torch.cuda.is_available() and torch._guards.detect_fake_mode() is None:
        return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    rows = bool(values) and isinstance(values[0], (list, tuple))
    flat = [x for row in values for x in row] if rows else list(values)
    kind, cast = (torch.float64, float) if dtype.is_floating_point else (torch.int64, int)
    out = torch.zeros((len(values), len(values[0])) if rows else (len(values),), dtype=kind, device=device)
    torch._foreach_add_(list(out.view(-1).unbind()), [cast(x) for x in flat])
    return out.to(dtype)


def _table(views: list[TensorView], hypers: list[Hyper], lengths: list[int], states: list[dict[str, Any]],
           beta1: float, device) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Per-tensor columns on ``device``: the small solve's (``SOLVE_PARAMS``: ``solve.tensor_params`` from the host,
    then ``solve.counter_params`` on the device counters, read before they move) and pass 2's
    (``solve.update_params``); and the ``counter_params`` of the tensors' blocks that refresh (one more refresh)."""
    rows = [{**tensor_params(h, k, t.U.dtype), **update_params(h)} for t, h, k in zip(views, hypers, lengths)]
    names = tuple(rows[0])
    table = dict(zip(names, _to_device([[row[name] for name in names] for row in rows], torch.float64,
                                       device).unbind(1)))
    t = torch.stack([st["step"] for st in states]).double() + 1
    q = torch.stack([st["curvature_steps"] for st in states]).double()
    refresh = counter_params(table, t, q + 1, beta1)
    table.update(counter_params(table, t, q, beta1))
    return table, refresh


def _count(states: list[dict[str, Any]], key: str, mask: Tensor) -> None:
    """``state[key] += mask[i]`` for every tensor: one foreach op."""
    torch._foreach_add_([st[key] for st in states], list(mask.long().unbind()))


def _pick(mask: Tensor, a: Tensor, b) -> Tensor:
    """``a`` in the blocks (rows) where ``mask``, else ``b``."""
    return torch.where(mask.view(-1, *[1] * (a.dim() - 1)), a, b)


def _solve_group(states, sizes, table, refresh, owner, ok_b, sel, lay: StatsLayout, S: Tensor) -> tuple[Tensor, dict]:
    """The small problems of one ``(n, refresh)`` group of blocks: writes the new ``s``, ``R``, ``e`` where the
    decisions allow, and returns pass 2's coefficient rows and the solve's outputs. ``sel``: the blocks that
    refresh (``None`` in a keep group); the others of a refresh group take the keep step's values."""
    clay = CoefLayout(lay.n)
    small = {name: torch.cat([st[name] for st in states]) for name in ("s", "R", "e")}
    column = {name: table[name].index_select(0, owner) for name in SOLVE_PARAMS + UPDATE_PARAMS}
    bl = Blocks(**small, **{name: column[name] for name in SOLVE_PARAMS})
    out = solve_keep(bl, lay, S)
    new = {"e": torch.where(ok_b, out["e"], bl.e)}
    if sel is not None:
        ref = solve_refresh(replace(bl, **{name: x.index_select(0, owner) for name, x in refresh.items()}), lay, S)
        for name in ("scale", "shrink", "update_sq", "span_sq"):
            out[name] = _pick(sel, ref[name], out[name])
        for name in _REFRESH_COEFS:
            out[name] = _pick(sel, ref[name], 0.0)
        new["s"], new["R"] = _pick(sel, ref["s"], bl.s), _pick(sel, ref["R"], bl.R)
    C = torch.zeros(S.shape[0], clay.width, dtype=torch.float64, device=S.device)
    names = ("scale", "shrink") + (_REFRESH_COEFS if sel is not None else ())
    _copy([clay.view(C, name) for name in names + UPDATE_PARAMS],
          [out[name] for name in names] + [column[name] for name in UPDATE_PARAMS])
    _copy([st[name] for name in new for st in states], [x for value in new.values() for x in value.split(sizes)])
    return C, out


def ginger(params: list[Tensor], grads: list[Tensor], curvatures: list[Tensor | None], states: list[dict[str, Any]],
           hypers: list[Hyper], *, beta1: float, compiled: bool = False, stats: dict[str, float] | None = None,
           spans: list[bool] | None = None, group=None, block_lengths: list[int] | None = None,
           gate: Tensor | None = None) -> None:
    """One Ginger step for a list of tensors, in place, on their devices; see ``fused.ginger`` for the arguments.

    ``gate`` (a 0-d bool tensor, optional): where False, nothing moves, counters included (the first step of a
    fresh optimizer with all-zero gradients only creates the state: ``Ginger._only_initializing``).
    """
    by_device: dict[torch.device, list[int]] = {}
    for i, p in enumerate(params):
        by_device.setdefault(p.device, []).append(i)
    for device, idx in by_device.items():
        views = [view_of(params[i], grads[i], curvatures[i], states[i], "torch") for i in idx]
        lengths = [t.k for t in views] if block_lengths is None else [block_lengths[i] for i in idx]
        _step(views, [states[i] for i in idx], [hypers[i] for i in idx], beta1, compiled, stats,
              None if spans is None else [spans[i] for i in idx], group, lengths, gate)


def _step(views, states, hypers, beta1, compiled, stats, spans, group, lengths, gate) -> None:
    device = views[0].U.device
    w1 = 1 - beta1
    for st in states:
        device_counters(st, device)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, t in enumerate(views):
        groups.setdefault((t.n, t.c is not None), []).append(i)
    for idx in groups.values():  # tensors of one signature side by side, so that they can share a pack
        idx.sort(key=lambda i: (views[i].k, str(_signature(views[i]))))
    layouts = {n: StatsLayout(n) for n, _ in groups}
    packs = {key: _packs(views, idx) for key, idx in groups.items()}

    # pass 1: every block's sums, one buffer per group
    sums: list[Tensor | None] = [None] * len(views)
    buffers, owners = {}, {}
    for key, idx in groups.items():
        sizes = [views[i].B for i in idx]
        S = buffers[key] = torch.zeros(sum(sizes), layouts[key[0]].width, dtype=torch.float64, device=device)
        owners[key] = torch.repeat_interleave(_to_device(idx, torch.int64, device),
                                              _to_device(sizes, torch.int64, device), output_size=sum(sizes))
        for i, part in zip(idx, S.split(sizes)):
            sums[i] = part
        start = 0
        for pack in packs[key]:
            t = _packed([views[i] for i in pack], writes=False)
            _pass1(t, w1, layouts[key[0]], S.narrow(0, start, t.B), compiled)
            start += t.B

    # the decisions, as masks: m'.m' and c.c are float64 sums of exact squares, finite iff every element is
    flags = torch.zeros(len(views), 2, dtype=torch.float64, device=device)
    for (n, _), idx in groups.items():
        S, lay = buffers[(n, _)], layouts[n]
        squares = torch.stack([lay.view(S, "mm"), lay.view(S, "cc")], 1)
        flags.index_add_(0, owners[(n, _)], torch.logical_not(torch.isfinite(squares)).double())
    if group is not None:
        exchange(sums, flags, spans, group)
    ok, c_ok = flags.select(1, 0) == 0, flags.select(1, 1) == 0
    live = torch.ones_like(ok) if gate is None else gate.expand_as(ok)
    has_c = _to_device([t.c is not None for t in views], torch.bool, device)
    applied = ok & live
    refreshed = applied & c_ok & has_c

    # the small problems, batched per group; then the counters move
    table, refresh = _table(views, hypers, lengths, states, beta1, device)
    _count(states, "step", applied)
    _count(states, "skipped", torch.logical_not(ok) & live)
    _count(states, "curvature_steps", refreshed)
    _count(states, "curvature_skipped", applied & has_c & torch.logical_not(c_ok))
    clipped = torch.zeros((), dtype=torch.int64, device=device)
    totals = torch.zeros(3, dtype=torch.float64, device=device)
    for (n, fresh), idx in groups.items():
        owner, sizes = owners[(n, fresh)], [views[i].B for i in idx]
        ok_b = applied.index_select(0, owner)
        sel = refreshed.index_select(0, owner) if fresh else None
        C, out = _solve_group([states[i] for i in idx], sizes, table, refresh, owner, ok_b, sel, layouts[n],
                              buffers[(n, fresh)])
        if stats is not None:
            gg = layouts[n].view(buffers[(n, fresh)], "gg")
            totals += torch.where(ok_b, torch.stack([out["update_sq"], out["span_sq"], gg]), 0).sum(1)
        start = 0
        for pack in packs[(n, fresh)]:
            vs = [views[i] for i in pack]
            t = _packed(vs, writes=True)
            rows = lambda x: x.narrow(0, start, t.B)  # noqa: E731
            clipped += _pass2(t, w1, rows(C), rows(ok_b), rows(sel) if fresh else None, compiled)
            _unpack(t, vs)
            start += t.B
    if stats is not None:  # opt-in: reads the device
        numel = (applied.double() * _to_device([t.p.numel() for t in views], torch.float64, device)).sum()
        for key, value in zip(("update_sq", "span_sq", "grad_sq"), totals.tolist()):
            stats[key] = stats.get(key, 0.0) + value
        stats["clipped"] = stats.get("clipped", 0) + int(clipped)
        stats["numel"] = stats.get("numel", 0) + int(numel)
