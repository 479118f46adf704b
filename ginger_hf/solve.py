"""The small problems of a fast Ginger step: float64, batched over every block of one rank.

The streaming passes (``ginger_hf.fused``) reduce each block to a few sums (``Stats``);
from them and the block's small state (``s``, ``R``, ``e``) this module computes the new
small state and the handful of coefficients (``Coefs``) with which pass 2 writes the
momentum, the parameter and the basis. Nothing here touches a ``d``-sized tensor.

The stored basis ``U`` (rows) of a block is any near-orthonormal basis of its curvature
subspace; the eigenbasis is ``R U``. On a refresh, with ``W = (U U^T)^{-1/2}`` the rows of
``W U`` are exactly orthonormal (rounding never accumulates in ``U``); in that basis the
rank-one EMA update of GINGER.md section 2 (eigen-decompose the ``(n+1)``-sized ``K``, drop
the smallest eigenpair ``e``) only needs a new basis of ``e``'s complement in
``span(U, c)``. The Householder reflection that maps the residual direction onto ``e``
gives one as a rank-one change, ``U <- U - shift v^T`` with ``v = v_u . U + v_c c``, and the
rotation to the new eigenbasis goes into ``R``: pass 2 costs O(n) per element.

Degenerate refreshes are closed forms of the same solve, not separate paths: when ``c``
lies in ``span(U)`` to within ``in_span_tolerance`` (a repeated gradient, a zero vector, or
a block with ``k <= tau``, whose basis spans everything), the residual direction is
dropped: ``U`` stays, only ``s`` and ``R`` move.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from . import symeig

__all__ = ["StatsLayout", "CoefLayout", "Blocks", "SOLVE_PARAMS", "tensor_params", "counter_params", "UPDATE_PARAMS",
           "update_params", "solve_params", "solve_refresh", "solve_keep", "in_span_tolerance"]


class StatsLayout:
    """Named views into a pass-1 row of sums, ``(..., width)`` float64, for blocks of rank ``n``.

    ``gram`` ``U U^T`` (upper triangle filled at least), ``uc`` ``U c``, ``um`` ``U m'``,
    ``cc`` ``c.c``, ``cm`` ``c.m'``, ``mm`` ``m'.m'``, ``gg`` ``g.g``, ``finite`` (a sum that is
    finite iff ``m'`` and ``c`` are), with ``m' = lerp(m, g, 1 - beta1)``.
    """

    def __init__(self, n: int):
        self.n = n
        names = [("gram", n * n), ("uc", n), ("um", n), ("cc", 1), ("cm", 1), ("mm", 1), ("gg", 1), ("finite", 1)]
        self.offsets, at = {}, 0
        for name, size in names:
            self.offsets[name] = (at, size)
            at += size
        self.width = at

    def view(self, stats: Tensor, name: str) -> Tensor:
        at, size = self.offsets[name]
        out = stats.narrow(-1, at, size)  # narrow/select, not indexing: fake devices refuse Python indexing
        if name == "gram":
            return out.unflatten(-1, (self.n, self.n))
        return out if size > 1 or name in ("uc", "um") else out.select(-1, 0)


class CoefLayout:
    """Named views into a pass-2 row of coefficients, ``(..., width)``, for blocks of rank ``n``.

    Pass 2 computes ``u = scale * (m' - shrink . U + along * v)`` with ``v = v_u . U + v_c * c``
    (refresh only), clips it to ``[-rho, rho]``, then ``p <- p * decay - lr * u`` and, on a
    refresh that adds a direction, ``U <- U - shift v^T``.
    """

    SCALARS = ("scale", "along", "lr", "decay", "rho", "v_c")

    def __init__(self, n: int):
        self.n = n
        self.offsets = {name: (i, 1) for i, name in enumerate(self.SCALARS)}
        at = len(self.SCALARS)
        for name in ("shrink", "shift", "v_u"):
            self.offsets[name] = (at, n)
            at += n
        self.width = at

    def view(self, coefs: Tensor, name: str) -> Tensor:
        at, size = self.offsets[name]
        out = coefs.narrow(-1, at, size)
        return out if name in ("shrink", "shift", "v_u") else out.select(-1, 0)


@dataclass
class Blocks:
    """Per-block inputs of the small solve, all float64 on the host, batch ``(N,)`` first.

    ``k`` block length; ``beta2``, ``damping``, ``relative_damping``, ``power``, ``debias``
    (of the curvature model: ``1 - beta2^q`` after this step's refresh, or 1), ``debias_e``
    (of ``e``: ``1 - beta2^t``, or 1), ``momentum_debias`` (``1 - beta1^t``),
    ``tolerance`` (``in_span_tolerance`` of the state dtype).
    """

    s: Tensor
    R: Tensor
    e: Tensor
    k: Tensor
    beta2: Tensor
    damping: Tensor
    relative_damping: Tensor
    power: Tensor
    debias: Tensor
    debias_e: Tensor
    momentum_debias: Tensor
    tolerance: Tensor


# The per-block parameters of the small solves: ``Blocks``' fields after the small state. The C++ kernel
# reads them by these names (``ginger_hf.kernel_interface``); both fast paths compute them with
# ``tensor_params`` and ``counter_params`` below (the kernel path on the host, the device path on the device).
SOLVE_PARAMS = tuple(f.name for f in fields(Blocks) if f.name not in ("s", "R", "e"))


def tensor_params(h, k: int, dtype: torch.dtype) -> dict[str, float]:
    """What one tensor's ``SOLVE_PARAMS`` are computed from that the host knows before the step: the
    hyper-parameters ``h`` (``functional.Hyper``), the block length ``k`` and the state dtype, and
    ``bias_correction`` (1.0 or 0.0) for ``counter_params``. Every ``SOLVE_PARAMS`` name not in
    ``counter_params`` is here."""
    return dict(k=k, beta2=h.beta2, damping=h.damping, relative_damping=h.relative_damping, power=h.power,
                tolerance=in_span_tolerance(dtype), bias_correction=float(h.bias_correction))


def counter_params(x: dict, t, q, beta1: float) -> dict:
    """The ``SOLVE_PARAMS`` that depend on the counters after this step, ``t`` steps and ``q`` refreshes.

    ``x``: ``tensor_params``' values. Either all Python numbers (the kernel path: one tensor), or per-tensor
    columns with ``t`` and ``q`` float64 tensors on their device (the device path: no host synchronisation).
    """
    on = x["bias_correction"] > 0
    return dict(debias=_where(on & (q > 0), 1 - x["beta2"] ** q, 1.0),
                debias_e=_where(on & (t > 0), 1 - x["beta2"] ** t, 1.0), momentum_debias=1 - beta1**t)


# Pass 2's per-tensor coefficients (``CoefLayout``'s fields that come from the hyper-parameters alone).
UPDATE_PARAMS = ("lr", "decay", "rho")


def update_params(h) -> dict[str, float]:
    """``UPDATE_PARAMS`` of hyper-parameters ``h``: ``lr``, ``decay`` (``1 - lr * weight_decay``), ``rho``."""
    return dict(lr=h.lr, decay=1 - h.lr * h.weight_decay, rho=math.inf if h.rho is None else h.rho)


def solve_params(h, t: int, q: int, beta1: float, k: int, dtype: torch.dtype) -> tuple[float, ...]:
    """One tensor's ``SOLVE_PARAMS`` from its hyper-parameters ``h``, after step ``t`` with ``q`` refreshes,
    for blocks of length ``k`` and state dtype ``dtype``."""
    values = tensor_params(h, k, dtype)
    values.update(counter_params(values, t, q, beta1))
    return tuple(float(values[name]) for name in SOLVE_PARAMS)


def _where(cond, a, b):
    """``torch.where`` for tensors, a Python ``if`` for numbers."""
    return torch.where(cond, a, b) if isinstance(cond, Tensor) else (a if cond else b)


def in_span_tolerance(dtype: torch.dtype) -> float:
    """Residual fraction ``|c - proj c| / |c|`` at or below which ``c`` counts as inside ``span(U)``.

    Above it, pass 2 forms the new direction implicitly, ``(c - U^T k) / r`` in the state
    dtype, to within ``eps / tol`` (8 eps: 1/8; ``W`` restores orthonormality at the next
    refresh, and the model itself errs by only ``(1 - beta2) eps |c|^2``). At or below it the
    residual is dropped, which tilts the model by at most ``(1 - beta2) tol`` relative. The
    floor 1e-7 is how finely ``r^2 = c.c - |U c|^2``, from float64 sums, resolves ``r``.
    """
    return max(8 * torch.finfo(dtype).eps, 1e-7)


def _col(x: Tensor) -> Tensor:
    return x.unsqueeze(-1)


def _mm(A: Tensor, B: Tensor) -> Tensor:
    """Batched product of small matrices, as a broadcast product and a sum: two memory-bound kernels. A batched GEMM
    runs one 32x32 tile per 5x5 product on a GPU: 180-380 us a call over 100k blocks on an H200, this 98 us."""
    return (A.unsqueeze(-1) * B.unsqueeze(-3)).sum(-2)


def _mv(A: Tensor, x: Tensor) -> Tensor:
    """Batched matrix-vector product (see ``_mm``)."""
    return (A * x.unsqueeze(-2)).sum(-1)


def _sym(G: Tensor) -> Tensor:
    """Fill the lower triangle from the upper one (kernels may write only the upper)."""
    n = G.shape[-1]
    upper = torch.ones(n, n, dtype=torch.bool, device=G.device).triu()
    return torch.where(upper, G, G.mT)


def _inverse_sqrt(G: Tensor) -> tuple[Tensor, Tensor]:
    """``(G^{-1/2}, G^{1/2})`` of symmetric positive definite matrices (Gram matrices of near-orthonormal rows).

    Coupled Newton-Schulz: matrix products only, a fixed number of iterations, no data-dependent branch and
    no host synchronisation. Four iterations take a ``G`` near ``I`` (``|G - I| < 1/2``: every Gram the step
    itself produces, rows re-orthonormalised at each refresh) to float64 rounding. A ``G`` further off is
    first divided by ``|G|_inf`` (eigenvalues in ``(0, 1]``, where the iteration converges) and gets eight
    more iterations, which blocks already converged sit out (masks), so that their result stays that of the
    first four.
    """
    n = G.shape[-1]
    eye = torch.eye(n, dtype=G.dtype, device=G.device)
    near = (G - eye).abs().sum(-1).amax(-1) < 0.5
    norm = torch.where(near, 1.0, G.abs().sum(-1).amax(-1)).unsqueeze(-1).unsqueeze(-1)
    Y = scaled = G / norm
    Z = eye.expand_as(G)
    for i in range(12):
        if i == 4:
            done = (_mm(_mm(Z, scaled), Z) - eye).abs().amax((-2, -1), keepdim=True) <= 1e-12
        T = 1.5 * eye - 0.5 * _mm(Z, Y)
        Y, Z = (_mm(Y, T), _mm(T, Z)) if i < 4 else (torch.where(done, Y, _mm(Y, T)), torch.where(done, Z, _mm(T, Z)))
    root = norm.sqrt()
    return Z / root, Y * root


def _direction(bl: Blocks, s: Tensor, e: Tensor, R: Tensor, um: Tensor, mm: Tensor) -> dict[str, Tensor]:
    """``shrink`` (``a``) and ``scale`` of ``u = scale (m' - a . U)``, and ``|u|^2`` and its part in ``span(U)`` (before clipping).

    ``u = f(G) m_hat`` with ``f(x) = x^-power`` and ``G = gamma I + U^T R^T diag(s_hat) R U``:
    ``f(G) = f(gamma) (I - B^T diag(phi) B)`` over the eigenbasis ``B = R U``, with
    ``phi = 1 - (gamma / (gamma + s_hat))^power``; with ``y = B m'``,
    ``|u|^2 = scale^2 (|m'|^2 - sum (2 phi - phi^2) y^2)`` and ``|B u|^2 = scale^2 sum ((1 - phi) y)^2``.
    """
    gamma = bl.damping + bl.relative_damping * e / (bl.debias_e * bl.k)
    s_hat = s / _col(bl.debias)
    phi = 1 - (_col(gamma) / (_col(gamma) + s_hat)).pow(_col(bl.power))
    y = _mv(R, um)
    a = _mv(R.mT, phi * y)
    scale = gamma.pow(-bl.power) / bl.momentum_debias
    update_sq = scale**2 * (mm - ((2 * phi - phi**2) * y * y).sum(-1)).clamp_min(0)
    span_sq = scale**2 * (((1 - phi) * y) ** 2).sum(-1)
    return dict(shrink=a, scale=scale, update_sq=update_sq, span_sq=span_sq)


def _gradient_energy(bl: Blocks, layout: StatsLayout, stats: Tensor) -> Tensor:
    """``e <- beta2 e + (1 - beta2) |g|^2``, every step: the scale of relative damping."""
    return bl.beta2 * bl.e + (1 - bl.beta2) * layout.view(stats, "gg")


def solve_keep(bl: Blocks, layout: StatsLayout, stats: Tensor) -> dict[str, Tensor]:
    """Coefficients of a step that keeps the curvature model (no refresh), and the new ``e``."""
    e_new = _gradient_energy(bl, layout, stats)
    return dict(_direction(bl, bl.s, e_new, bl.R, layout.view(stats, "um"), layout.view(stats, "mm")), e=e_new)


def solve_refresh(bl: Blocks, layout: StatsLayout, stats: Tensor) -> dict[str, Tensor]:
    """The refresh of every block: new ``s``, ``R``, ``e`` and pass 2's coefficients.

    Returns a dict with ``s``, ``R``, ``e``, ``rotate`` (bool: the basis gains a direction;
    False for the in-span closed form), ``shrink``, ``shift``, ``v_u``, ``v_c``, ``along``, ``scale``,
    ``update_sq`` and ``span_sq`` (see ``_direction``). ``ginger_hf.kernel.solve_refresh``
    computes the same on CPU, block by block in C++.
    """
    n = layout.n
    W, Wi = _inverse_sqrt(_sym(layout.view(stats, "gram")))
    uc, um = layout.view(stats, "uc"), layout.view(stats, "um")
    cc, cm = layout.view(stats, "cc"), layout.view(stats, "cm")
    k = _mv(W, uc)  # c in the orthonormal basis W U
    RB = _mm(bl.R, Wi)  # the eigenbasis in W U: orthogonal up to rounding, made exactly so
    RB = _mm(RB, _inverse_sqrt(_mm(RB.mT, RB))[0])
    r = (cc - (k * k).sum(-1)).clamp_min(0).sqrt()
    rotate = r > bl.tolerance * cc.sqrt()
    r = torch.where(rotate, r, torch.zeros_like(r))
    z = torch.cat([_mv(RB, k), _col(r)], 1)
    K = _col(_col(1 - bl.beta2)) * _col(z) * z.unsqueeze(1)
    # + diag(beta2 s, 0); in span, -1 in the residual slot: pinned below the rest, so that it is dropped
    K = K + torch.diag_embed(torch.cat([_col(bl.beta2) * bl.s, -_col(torch.logical_not(rotate).double())], 1))
    lam, V = symeig.eigh(K)  # ascending: column 0 is the eigenpair to drop
    drop = V.select(2, 0)  # the eigenvector dropped, in coordinates (old eigenbasis, residual) ...
    e_drop = torch.cat([_mv(RB.mT, drop.narrow(1, 0, n)), drop.narrow(1, n, 1)], 1)  # ... and in (W U, residual)
    sigma = _col(torch.where(e_drop.select(1, n) >= 0, -1.0, 1.0))  # reflect far from e_drop: |v|^2 >= 2
    last = torch.cat([torch.zeros(n, dtype=K.dtype, device=K.device), torch.ones(1, dtype=K.dtype, device=K.device)])
    v = -sigma * e_drop + last
    vv = (v * v).sum(-1)
    H = torch.eye(n + 1, dtype=torch.float64, device=K.device) - 2 * _col(v) * v.unsqueeze(1) / _col(_col(vv))
    Q = H.narrow(1, 0, n)  # orthonormal basis of e_drop's complement, in coordinates (W U, residual)
    C = V.narrow(2, 1, n).mT  # the new eigenbasis in coordinates (old eigenbasis, residual) ...
    C = torch.cat([_mm(C.narrow(2, 0, n), RB), C.narrow(2, n, 1)], 2)  # ... and in (W U, residual)
    R_new = _mm(_mm(C, Q.mT), W)
    v_head, v_last = v.narrow(1, 0, n), v.narrow(1, n, 1)
    beta = 2 * v_head / _col(vv)
    safe_r = torch.where(rotate, r, torch.ones_like(r))
    v_u = torch.where(_col(rotate), v_head - v_last * k / _col(safe_r), 0.0)
    v_c = torch.where(rotate, v_last.select(1, 0) / safe_r, 0.0)
    shift = torch.where(_col(rotate), _mv(Wi, beta), 0.0)
    v_u = _mv(W, v_u)
    s_new = lam.narrow(1, 1, n).clamp_min(0)
    e_new = _gradient_energy(bl, layout, stats)
    um_new = um - shift * _col((v_u * um).sum(-1) + v_c * cm)  # U_new m'
    out = _direction(bl, s_new, e_new, R_new, um_new, layout.view(stats, "mm"))
    return dict(out, s=s_new, R=R_new, e=e_new, rotate=rotate, shift=shift, v_u=v_u, v_c=v_c,
                along=(out["shrink"] * shift).sum(-1))
