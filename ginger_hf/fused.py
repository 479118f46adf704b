"""A Ginger step in two streaming passes over the state: the fast path the optimizer uses.

Same signature and result (to rounding) as ``functional.ginger``, which stays the
reference. The stored ``U`` (n, d rows) is an orthonormal basis of the curvature subspace
and ``R`` (n, n) rotates it to the eigenbasis ``R U`` of ``s``: the basis moves by cheap
rank-one reflections and the rest of each rotation lands in ``R``. GINGER.md section 4:
per block, on a refresh step

* pass 1 reads ``U, c, g, m`` and writes nothing: with ``m' = lerp(m, g, 1 - beta1)`` it
  forms the sums ``G = U U^T``, ``U c``, ``U m'``, ``c.c``, ``c.m'`` (float32 products,
  float64 sums) and finds non-finite inputs, whose blocks are then skipped untouched;
* the small problems of all blocks of equal rank are solved together in float64
  (``_solve_refresh``): ``W = G^{-1/2}`` makes ``W U`` exactly orthonormal (rounding
  never accumulates), the rank-one EMA update runs on the ``(n+1)``-sized problem, and a
  Householder reflection gives the new basis as ``U_new = U - bt v^T`` with
  ``v = U^T nu + nu_c c``; the direction is ``u = scale * (m' - U^T a + ab v)``;
* pass 2 reads ``U, c, g, m`` and the parameter, writes ``m'``, the parameter and
  ``U_new`` in place: O(n) work per element, where rotating ``U`` into the eigenbasis
  itself would be O(n^2) and outrun the memory traffic from n of about 8. (Recomputing ``m'`` costs one read of ``g``; storing it in pass 1
  would cost a write, a read, and a separate finiteness pass before it.)

Between refreshes pass 1 forms only ``U m`` and pass 2 does not write ``U``. Nothing of
size ``d * tau`` is allocated. Where ``c`` lies almost in the span of ``U`` (residual
below ``_FAST_RESIDUAL * ||c||``) the implicit residual ``c - U^T k`` would lose
digits, so that block's curvature update runs the reference code instead (rare).

Three backends run the passes: a small C++ kernel (``_cpu_kernel.cpp``, float32/bfloat16
on CPU, built once with the system compiler and loaded with ctypes); ``torch.compile`` of
whole-block expressions (the default on CUDA: each pass becomes fused kernels, no
``n * d`` temporaries); and eager torch in cache-sized column chunks (any device and
dtype), used when neither applies.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from . import functional as F

__all__ = ["ginger", "all_finite", "kernel_available", "BACKENDS"]

BACKENDS = (None, "torch", "compile")

# Below this residual fraction ||c - U^T U c|| / ||c|| the block falls back to the reference
# curvature update: the implicit basis rotation would cost ~eps / fraction of orthonormality.
_FAST_RESIDUAL = 1e-2
# Columns per chunk of the torch backend (temporaries are (n + 2) * chunk numbers).
_TORCH_CHUNK = {"cpu": 1 << 15}
_TORCH_CHUNK_DEFAULT = 1 << 22
# Below this many elements in a call, one thread does the whole pass.
_SERIAL_ELEMENTS = 1 << 16

_KERNEL_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
_KERNEL_SOURCE = Path(__file__).with_name("_cpu_kernel.cpp")
_kernel = None
_kernel_tried = False
_kernel_lock = threading.Lock()


# -- the C++ kernel -------------------------------------------------------------------


def _cache_dir() -> Path:
    root = os.environ.get("GINGER_HF_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ginger_hf"
    )
    return Path(root)


def _build_kernel() -> ctypes.CDLL | None:
    """Compile ``_cpu_kernel.cpp`` once per source/compiler/CPU and load it; ``None`` if impossible."""
    if os.environ.get("GINGER_HF_KERNEL", "1") == "0" or not _KERNEL_SOURCE.exists():
        return None
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        return None
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-march=native")
    else:
        flags.append("-mcpu=native")
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    cpu = ""
    try:
        cpu = next((line for line in open("/proc/cpuinfo") if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    key = hashlib.sha256("\0".join([_KERNEL_SOURCE.read_text(), cxx, version, " ".join(flags), cpu]).encode()).hexdigest()[:16]
    lib = _cache_dir() / f"ginger_cpu_{key}.so"
    if not lib.exists():
        lib.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
        os.close(fd)
        try:
            proc = subprocess.run([cxx, *flags, str(_KERNEL_SOURCE), "-o", tmp], capture_output=True, text=True)
            if proc.returncode != 0:
                warnings.warn(f"ginger_hf: could not build the CPU kernel, using the torch path:\n{proc.stderr[-2000:]}")
                return None
            os.replace(tmp, lib)  # atomic: concurrent builders (e.g. DDP ranks) do not clash
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    dll = ctypes.CDLL(str(lib))
    p, i, f = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
    dll.ginger_pass1.argtypes = [i, i, i, p, p, f, p, i, i]
    dll.ginger_pass2.argtypes = [i, i, i, p, p, f, p, i, i]
    dll.ginger_supported_rank.argtypes = [i]
    return dll


def _get_kernel() -> ctypes.CDLL | None:
    global _kernel, _kernel_tried
    if not _kernel_tried:
        with _kernel_lock:
            if not _kernel_tried:
                try:
                    _kernel = _build_kernel()
                except Exception as exc:  # a broken toolchain must not break training
                    warnings.warn(f"ginger_hf: CPU kernel unavailable ({exc!r}); using the torch path")
                    _kernel = None
                _kernel_tried = True
    return _kernel


def kernel_available() -> bool:
    """Whether the compiled CPU kernel is in use (builds it on first call)."""
    return _get_kernel() is not None


def _kernel_ok(kernel, p: Tensor, g: Tensor, c: Tensor | None, m: Tensor, U: Tensor) -> bool:
    return (
        kernel is not None
        and p.device.type == "cpu"
        and m.dtype in _KERNEL_DTYPES
        and U.dtype == m.dtype
        and p.dtype in _KERNEL_DTYPES
        and g.dtype == p.dtype
        and (c is None or c.dtype == p.dtype)
        and p.is_contiguous()
        and U.is_contiguous()
        and m.is_contiguous()
        and bool(kernel.ginger_supported_rank(U.shape[0]))
    )


# -- the two passes ---------------------------------------------------------------------


def _stride(n: int) -> int:
    return n * n + 2 * n + 3


def _pass1_torch(U: Tensor, m: Tensor, g: Tensor, c: Tensor | None, w1: float, out: Tensor, compiled: bool) -> None:
    """``out = [G (n*n), U c, U m, c.c, c.m, chk]`` with ``m`` read as ``lerp(m, g, w1)``; writes no state.

    Float64 sums, chunk by chunk (or compiled whole); ``chk`` is ``c.c + m.m``, finite iff both vectors are.
    """
    n, d = U.shape
    S = _run_compiled(_pass1_whole, U, m, g, c, w1) if compiled else NotImplemented
    if S is NotImplemented:
        chunk = _TORCH_CHUNK.get(U.device.type, _TORCH_CHUNK_DEFAULT)
        S = torch.zeros(n + 2, n + 2, dtype=torch.float64, device=U.device)
        for s in range(0, d, chunk):
            e = min(d, s + chunk)
            mv = torch.lerp(m[s:e], g[s:e].to(m.dtype), w1)
            rows = [U[:, s:e], (c[s:e] if c is not None else mv).to(U.dtype)[None], mv[None]]
            Y = torch.cat(rows).double()
            S.addmm_(Y, Y.T)
    out[: n * n] = S[:n, :n].reshape(-1)
    out[n * n : n * n + n] = S[:n, n]
    out[n * n + n : n * n + 2 * n] = S[:n, n + 1]
    out[n * n + 2 * n] = S[n, n]
    out[n * n + 2 * n + 1] = S[n, n + 1]
    out[n * n + 2 * n + 2] = S[n, n] + S[n + 1, n + 1]


def _pass2_torch(U: Tensor, m: Tensor, g: Tensor, p: Tensor, c: Tensor | None, w1: float, row: Tensor,
                 coef: list[float], rotate: bool, compiled: bool) -> None:
    """``m <- lerp(m, g, w1)``; ``u = scale (m - U^T a + ab v)``, clip, update ``p``; on refresh ``U <- U - bt v^T``.

    ``v = U^T nu + nu_c c`` (refresh only). ``row`` is the block's coefficient row on the
    device, ``coef`` its first six entries on the host.
    """
    n, d = U.shape
    a = row[6 : 6 + n]
    bt = row[6 + n : 6 + 2 * n] if rotate else None
    nu = row[6 + 2 * n : 6 + 3 * n] if rotate else None
    c = c if rotate else None
    if compiled and p.is_contiguous():
        if _run_compiled(_pass2_whole, U, m, g, p.view(-1), c, w1, row[:6], a, bt, nu) is not NotImplemented:
            return
    scale, ab, lr, decay, rho, nu_c = coef
    flat = p.view(-1) if p.is_contiguous() else p.reshape(-1).clone()
    a = a.to(U.dtype)
    if rotate:
        bt, nu = bt.to(U.dtype), nu.to(U.dtype)
    chunk = _TORCH_CHUNK.get(U.device.type, _TORCH_CHUNK_DEFAULT)
    for s in range(0, d, chunk):
        e = min(d, s + chunk)
        Uc = U[:, s:e]
        mc = m[s:e]
        mc.lerp_(g[s:e].to(m.dtype), w1)
        u = torch.addmv(mc, Uc.T, a, alpha=-1)
        if rotate:
            v = torch.addmv(c[s:e].to(U.dtype), Uc.T, nu, beta=nu_c)
            u.add_(v, alpha=ab)
        u.mul_(scale)
        if math.isfinite(rho):
            u.clamp_(-rho, rho)
        pc = flat[s:e]
        if decay != 1.0:
            pc.mul_(decay)
        pc.add_(u.to(p.dtype), alpha=-lr)
        if rotate:
            Uc.addr_(bt, v, alpha=-1)
    if flat.data_ptr() != p.data_ptr():
        p.copy_(flat.view_as(p))


# -- whole-block passes for torch.compile (the GPU path) -------------------------------------


def _pass1_whole(U: Tensor, m: Tensor, g: Tensor, c: Tensor | None, w1: float) -> Tensor:
    """Pass 1's ``(n+2) x (n+2)`` float64 sums as one expression; compiled, a single fused reduction."""
    mv = torch.lerp(m, g.to(m.dtype), w1)
    Y = torch.cat([U, (mv if c is None else c.to(U.dtype))[None], mv[None]]).to(torch.float64)
    return (Y[:, None, :] * Y[None, :, :]).sum(-1)


def _pass2_whole(U: Tensor, m: Tensor, g: Tensor, p: Tensor, c: Tensor | None, w1: float, coef: Tensor,
                 a: Tensor, bt: Tensor | None, nu: Tensor | None) -> None:
    """Pass 2 of one block (flat ``p``), in place; ``coef = [scale, ab, lr, decay, rho, nu_c]`` on device."""
    dt = U.dtype
    mv = torch.lerp(m, g.to(m.dtype), w1)
    u = mv - (a.to(dt)[:, None] * U).sum(0)
    if c is not None:
        v = (nu.to(dt)[:, None] * U).sum(0) + coef[5].to(dt) * c.to(dt)
        u = u + coef[1].to(dt) * v
    u = (u * coef[0].to(dt)).clamp(-coef[4], coef[4])
    p.copy_(p * coef[3].to(p.dtype) - coef[2].to(p.dtype) * u.to(p.dtype))
    m.copy_(mv)
    if c is not None:
        U.sub_(bt.to(dt)[:, None] * v[None, :])


_compiled: dict[str, object] = {}
_compile_failed = False


def _run_compiled(fn, *args):
    """``torch.compile(fn)(*args)``; ``NotImplemented`` (once warned) where compiling fails, e.g. no Triton."""
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


# -- the small problems -------------------------------------------------------------------


def _inverse_sqrt(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(G^{-1/2}, G^{1/2})`` of a batch of symmetric positive definite matrices."""
    e, Q = torch.linalg.eigh(G)
    root = e.clamp_min(1e-30).sqrt()[:, None, :]
    return (Q / root) @ Q.mT, (Q * root) @ Q.mT


def _solve_refresh(stats: Tensor, n: int, s: Tensor, R: Tensor, beta2: Tensor, damping: Tensor):
    """Batched float64 solve for refresh blocks of rank ``n``: the curvature update as a reflection of ``U``.

    ``stats`` (B, stride) as pass 1 writes them, ``s`` (B, n), ``R`` (B, n, n), ``beta2`` and
    ``damping`` (B,). The stored ``U``
    is any near-orthonormal basis of the curvature subspace; the eigenbasis is ``R U``.
    With ``W = (U U^T)^{-1/2}`` the rows of ``W U`` are exactly orthonormal (rounding never
    accumulates), and in that basis the rank-one EMA update of GINGER.md section 2 (eigen-
    decompose the ``(n+1)``-sized ``K``, drop the smallest eigenpair ``e``) only needs a new
    basis of ``e``'s orthogonal complement in ``span(U, c)``. The Householder reflection that
    maps the residual direction onto ``e`` gives one, as a rank-one update:
    ``U <- U - bt (nu . U + nu_c c)``; the rotation to the new eigenbasis goes into ``R``.
    Pass 2 thus costs O(n) per element instead of the O(n^2) of rotating ``U`` itself.

    Returns ``fast`` (B,) bool (False: ``c`` is too close to ``span(U)`` for the implicit
    residual), ``s_new`` (B, n), ``R_new`` (B, n, n) and pass 2's ``a``, ``bt``, ``nu`` (B, n),
    ``nu_c``, ``ab`` (B,): ``u = scale (m - a.U + ab v)`` with ``v = nu.U + nu_c c``.
    """
    Bn = stats.shape[0]
    G = stats[:, : n * n].reshape(Bn, n, n)
    upper = torch.arange(n)[:, None] <= torch.arange(n)[None, :]
    G = torch.where(upper, G, G.mT)  # the kernel fills the upper triangle only
    kc = stats[:, n * n : n * n + n]
    wm = stats[:, n * n + n : n * n + 2 * n]
    cc = stats[:, n * n + 2 * n]
    cm = stats[:, n * n + 2 * n + 1]
    W, Wi = _inverse_sqrt(G)
    k = (W @ kc[..., None])[..., 0]  # c in the orthonormal basis B = W U
    RB = R @ Wi  # the eigenbasis in B: orthogonal up to rounding, made exactly so
    RB = RB @ _inverse_sqrt(RB.mT @ RB)[0]
    r = (cc - (k * k).sum(-1)).clamp_min(0).sqrt()
    fast = r > _FAST_RESIDUAL * cc.sqrt()
    r = torch.where(fast, r, torch.ones_like(r))
    z = torch.cat([(RB @ k[..., None])[..., 0], r[:, None]], 1)
    K = (1 - beta2)[:, None, None] * z[:, :, None] * z[:, None, :]
    K[:, :n, :n] += torch.diag_embed(beta2[:, None] * s)
    lam, V = torch.linalg.eigh(K)  # ascending: column 0 is the eigenpair to drop
    e = torch.cat([(RB.mT @ V[:, :n, :1])[..., 0], V[:, n:, 0]], 1)  # in coordinates (B, residual)
    sigma = torch.where(e[:, n] >= 0, -1.0, 1.0)[:, None]  # reflect far from e: |v|^2 >= 2
    v = -sigma * e
    v[:, n] += 1
    H = torch.eye(n + 1, dtype=torch.float64) - 2 * v[:, :, None] * v[:, None, :] / (v * v).sum(-1)[:, None, None]
    Q = H[:, :n, :]  # new orthonormal basis of e's complement, in coordinates (B, residual)
    C = V[:, :, 1:].mT.clone()  # the new eigenbasis, in coordinates (old eigenbasis, residual) ...
    C[:, :, :n] = C[:, :, :n] @ RB  # ... and in (B, residual)
    R_new = (C @ Q.mT) @ W
    beta = 2 * v[:, :n] / (v * v).sum(-1)[:, None]
    nu = v[:, :n] - v[:, n:] * k / r[:, None]
    nu_c = v[:, n] / r
    bt = (Wi @ beta[..., None])[..., 0]
    nu = (W @ nu[..., None])[..., 0]
    s_new = lam[:, 1:].clamp_min(0)
    wm_new = wm - bt * ((nu * wm).sum(-1) + nu_c * cm)[:, None]
    q = s_new / (damping[:, None] + s_new) * (R_new @ wm_new[..., None])[..., 0]
    a = (R_new.mT @ q[..., None])[..., 0]
    return fast, s_new, R_new, a, bt, nu, nu_c, (a * bt).sum(-1)


def all_finite(t: Tensor) -> Tensor:
    """0-d bool tensor: no NaN/inf in ``t``. One read-only pass (``isfinite(t).all()`` writes a d-sized mask)."""
    if t.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=t.device)
    lo, hi = torch.aminmax(t)
    return torch.isfinite(lo) & torch.isfinite(hi)


# -- the step --------------------------------------------------------------------------------


def _kernel_args(idx: list[int], Us, use_c: list[bool], *columns) -> tuple[Tensor, Tensor, int]:
    """Per-block ``(rank, d, use_c)`` rows, data pointers (one per column, 0 for ``None``) and a thread count."""
    meta = torch.tensor([[Us[i].shape[0], Us[i].shape[1], int(use_c[i])] for i in idx], dtype=torch.int64)
    ptrs = torch.tensor([[0 if col[i] is None else col[i].data_ptr() for col in columns] for i in idx], dtype=torch.int64)
    work = sum(Us[i].shape[1] for i in idx)
    return meta, ptrs, 1 if work < _SERIAL_ELEMENTS else torch.get_num_threads()


def ginger(
    params: list[Tensor],
    grads: list[Tensor],
    curvatures: list[Tensor | None],
    ms: list[Tensor],
    Us: list[Tensor],
    ss: list[Tensor],
    Rs: list[Tensor],
    steps: list[int],
    *,
    lr: float | Sequence[float],
    beta1: float,
    beta2: float | Sequence[float],
    damping: float | Sequence[float],
    rho: float | None | Sequence[float | None],
    weight_decay: float | Sequence[float],
    backend: str | None = None,
) -> list[bool]:
    """One Ginger step for a list of blocks sharing hyper-parameters (see ``functional.ginger``).

    Returns, per block, whether it was applied: a block whose gradient or curvature vector
    is not finite is left bit-identical (pass 1 writes nothing, so nothing needs undoing).
    ``lr``, ``beta2``, ``damping``, ``rho`` and ``weight_decay`` may also be given per block,
    so param groups that differ only in those share one call (one solve, one kernel call
    per pass).
    ``backend``: ``None`` picks the C++ kernel where it applies, ``torch.compile`` on CUDA,
    else eager torch; ``"torch"`` and ``"compile"`` force those passes on any device (tests
    use them to cover both paths on CPU).
    """
    if backend not in BACKENDS:
        raise ValueError(f"ginger: backend must be one of {BACKENDS}, got {backend!r}")
    nb = len(params)
    if nb == 0:
        return []
    kernel = None if backend in ("torch", "compile") else _get_kernel()
    compiled = [backend == "compile" or (backend is None and U.device.type == "cuda") for U in Us]
    flat_g = [g.reshape(-1) for g in grads]
    flat_c = [None if c is None else c.reshape(-1) for c in curvatures]
    flat_g = [g if g.is_contiguous() else g.contiguous() for g in flat_g]
    flat_c = [c if c is None or c.is_contiguous() else c.contiguous() for c in flat_c]
    use_kernel = [_kernel_ok(kernel, params[i], flat_g[i], flat_c[i], ms[i], Us[i]) for i in range(nb)]
    per_block = {name: torch.tensor(value if isinstance(value, Sequence) else [value] * nb, dtype=torch.float64)
                 for name, value in (("lr", lr), ("beta2", beta2), ("damping", damping), ("weight_decay", weight_decay))}
    rhos = rho if isinstance(rho, Sequence) else [rho] * nb
    per_block["rho"] = torch.tensor([math.inf if r is None else r for r in rhos], dtype=torch.float64)
    ns = [U.shape[0] for U in Us]
    stride = _stride(max(ns))
    w1 = 1 - beta1

    # Pass 1 (reads only): the sums, and whether the inputs are finite.
    stats = torch.zeros(nb, stride, dtype=torch.float64)
    kernel_groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    torch_rows: dict[torch.device, tuple[list[int], list[Tensor]]] = defaultdict(lambda: ([], []))
    for i in range(nb):
        if use_kernel[i]:
            kernel_groups[(_KERNEL_DTYPES[ms[i].dtype], _KERNEL_DTYPES[params[i].dtype])].append(i)
        else:
            row = torch.zeros(stride, dtype=torch.float64, device=Us[i].device)
            _pass1_torch(Us[i], ms[i], flat_g[i], flat_c[i], w1, row, compiled[i])
            torch_rows[row.device][0].append(i)
            torch_rows[row.device][1].append(row)
    for idx, rows in torch_rows.values():  # one device-to-host copy per device (the solve needs the sums)
        stats[idx] = torch.stack(rows).cpu()
    for (sdt, pdt), idx in kernel_groups.items():
        meta, ptrs, nt = _kernel_args(idx, Us, [c is not None for c in flat_c], Us, ms, flat_g, flat_c)
        out = torch.zeros(nt, len(idx), stride, dtype=torch.float64)
        rc = kernel.ginger_pass1(sdt, pdt, len(idx), meta.data_ptr(), ptrs.data_ptr(), w1, out.data_ptr(), stride, nt)
        if rc != 0:
            raise RuntimeError(f"ginger_hf CPU kernel pass 1 failed ({rc})")
        stats[idx] = out.sum(0)
    applied = torch.isfinite(stats).all(1).tolist()
    refresh = [applied[i] and flat_c[i] is not None for i in range(nb)]

    # The small problems, batched by rank. coefs rows: [scale, ab, lr, decay, rho, nu_c, a, bt, nu].
    cstride = 6 + 3 * max(ns)
    coefs = torch.zeros(nb, cstride, dtype=torch.float64)
    rotate = [False] * nb
    slow = []
    by_rank: dict[int, list[int]] = defaultdict(list)
    for i in range(nb):
        if refresh[i]:
            by_rank[ns[i]].append(i)
    for n, idx in by_rank.items():
        s = torch.stack([ss[i] for i in idx]).to(torch.float64).cpu()
        R = torch.stack([Rs[i] for i in idx]).to(torch.float64).cpu()
        fast, s_new, R_new, a, bt, nu, nu_c, ab = _solve_refresh(
            stats[idx], n, s, R, per_block["beta2"][idx], per_block["damping"][idx]
        )
        fast_rows = [row for row, ok in enumerate(fast.tolist()) if ok]
        fast_set = set(fast_rows)
        slow += [idx[row] for row in range(len(idx)) if row not in fast_set]
        if not fast_rows:
            continue
        ids = [idx[row] for row in fast_rows]
        rows = torch.tensor(fast_rows)
        dev = ss[ids[0]].device
        torch._foreach_copy_([ss[i] for i in ids], [x.to(dev) for x in s_new[rows].unbind(0)])
        torch._foreach_copy_([Rs[i] for i in ids], [x.to(dev) for x in R_new[rows].unbind(0)])
        at = torch.tensor(ids)
        coefs[at, 1] = ab[rows]
        coefs[at, 5] = nu_c[rows]
        coefs[at, 6 : 6 + n] = a[rows]
        coefs[at, 6 + n : 6 + 2 * n] = bt[rows]
        coefs[at, 6 + 2 * n : 6 + 3 * n] = nu[rows]
        for i in ids:
            rotate[i] = True
    if slow:
        # c (almost) in the span of U: the reference update (two Gram-Schmidt passes) on the
        # eigenbasis R U, made explicit (allocates n * d; rare), then U m afresh.
        for i in slow:
            Us[i].copy_((Rs[i].to(Us[i]) @ Us[i]))
            Rs[i].copy_(torch.eye(ns[i], dtype=Rs[i].dtype))
        F.update_curvature([Us[i] for i in slow], [ss[i] for i in slow], [flat_c[i] for i in slow],
                           per_block["beta2"][torch.tensor(slow)].tolist())
        for i in slow:
            n = ns[i]
            m_new = torch.lerp(ms[i], flat_g[i].to(ms[i].dtype), w1)
            stats[i, n * n + n : n * n + 2 * n] = (Us[i] @ m_new).to(torch.float64).cpu()
    # Blocks that keep their basis: a = R^T diag(s / (gamma + s)) R U m.
    keep: dict[int, list[int]] = defaultdict(list)
    for i in range(nb):
        if applied[i] and not rotate[i]:
            keep[ns[i]].append(i)
    for n, idx in keep.items():
        s = torch.stack([ss[i] for i in idx]).to(torch.float64).cpu()
        R = torch.stack([Rs[i] for i in idx]).to(torch.float64).cpu()
        at = torch.tensor(idx)
        wm = stats[at, n * n + n : n * n + 2 * n]
        q = s / (per_block["damping"][at][:, None] + s) * (R @ wm[..., None])[..., 0]
        coefs[at, 6 : 6 + n] = (R.mT @ q[..., None])[..., 0]
    coefs[:, 0] = 1.0 / (per_block["damping"] * (1 - beta1 ** torch.tensor(steps, dtype=torch.float64)))
    coefs[:, 2] = per_block["lr"]
    coefs[:, 3] = 1 - per_block["lr"] * per_block["weight_decay"]
    coefs[:, 4] = per_block["rho"]

    # Pass 2: the momentum, the parameter and (on refresh) the rotated basis.
    coefs32 = coefs.to(torch.float32)
    scalars = coefs[:, :6].tolist()  # host numbers already: one conversion for all blocks
    coefs_on: dict[torch.device, Tensor] = {}
    kernel_groups = defaultdict(list)
    for i in range(nb):
        if not applied[i]:
            continue
        if use_kernel[i]:
            kernel_groups[(_KERNEL_DTYPES[ms[i].dtype], _KERNEL_DTYPES[params[i].dtype])].append(i)
            continue
        dev = Us[i].device
        if dev not in coefs_on:
            coefs_on[dev] = coefs.to(dev)
        _pass2_torch(Us[i], ms[i], flat_g[i], params[i], flat_c[i], w1, coefs_on[dev][i], scalars[i], rotate[i],
                     compiled[i])
    for (sdt, pdt), idx in kernel_groups.items():
        meta, ptrs, nt = _kernel_args(idx, Us, rotate, Us, ms, flat_g, params, [c if r else None for c, r in zip(flat_c, rotate)])
        block_coefs = coefs32[idx].contiguous()
        rc = kernel.ginger_pass2(sdt, pdt, len(idx), meta.data_ptr(), ptrs.data_ptr(), w1, block_coefs.data_ptr(),
                                 cstride, nt)
        if rc != 0:
            raise RuntimeError(f"ginger_hf CPU kernel pass 2 failed ({rc})")
    return applied
