"""Batched symmetric eigen-decomposition of many small matrices without a host synchronisation.

``torch.linalg.eigh`` checks its LAPACK/cuSOLVER status on CUDA (a synchronisation: there is no
``eigh_ex``), and per-matrix solver launches do not batch well for thousands of 5x5 problems.
Cyclic Jacobi does: each round rotates disjoint index pairs of every matrix at once (a
round-robin "tournament" ordering), as gathers and elementwise products (``eigh``), so the work is a
fixed sequence of batched ops, the same on every device, with no data-dependent branch (a pair
already zero rotates by the identity).
Jacobi is accurate to a few ulps of ``|A|`` per eigenvalue; a fixed number of sweeps suffices
because convergence is quadratic once the off-diagonal part is small (``SWEEPS`` is chosen by
``tests/test_device_step.py::test_jacobi_eigh_matches_lapack`` on random, tied and deflated problems
up to size 11, tau 10: 8 sweeps reach float64 rounding there, 5-6 already do).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["eigh"]

SWEEPS = 8


def _rounds(size: int, device) -> list[tuple[Tensor, Tensor]]:
    """The circle method's pairings of ``0..size-1``: ``size - 1`` (even) or ``size`` (odd) rounds of disjoint
    pairs ``(P[i], Q[i])``, every pair once. Index arithmetic on the device: no host-built tensor to copy."""
    players = size + size % 2  # an odd size gets a bye: the padded player
    fixed = players - 1
    i = torch.arange(1, players // 2, device=device)
    rounds = []
    for r in range(players - 1):
        P, Q = (r + i) % fixed, (r - i) % fixed
        if fixed < size:  # the fixed player is real: it meets player r
            P = torch.cat([P, torch.full((1,), r, device=device)])
            Q = torch.cat([Q, torch.full((1,), fixed, device=device)])
        rounds.append((P, Q))
    return rounds


def _plan(size: int, P: Tensor, Q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """A round's indices: the flat indices of ``A[p, p]``, ``A[q, q]`` and ``A[p, q]``, each index's partner (itself
    for a bye), and each index's slot in ``[c | c | 1]`` and ``[-s | s | 0]``, the rows of which the rotation's
    coefficients are gathered."""
    pairs = torch.arange(P.numel(), device=P.device)
    index = torch.arange(size, device=P.device)
    partner = index.index_copy(0, P, Q).index_copy(0, Q, P)
    slot = torch.full_like(index, 2 * P.numel()).index_copy(0, P, pairs).index_copy(0, Q, pairs + P.numel())
    return torch.cat([P * (size + 1), Q * (size + 1), P * size + Q]), partner, slot


def eigh(A: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """``(lam, V)`` of symmetric ``A`` ``(..., N, N)``: ascending eigenvalues and orthonormal eigenvectors (columns).

    A rotation of the pairs ``(p, q)`` by ``J`` (``J[p, p] = J[q, q] = c``, ``J[p, q] = -J[q, p] = s``) mixes only rows
    and columns ``p`` and ``q``: ``(J^T A)[p] = c A[p] - s A[q]`` and ``(J^T A)[q] = s A[p] + c A[q]``, and likewise the
    columns of ``A J`` and ``V J``. So each round is a gather of the partners' rows (then columns) and two
    elementwise products, not a matrix product: on a GPU a batched GEMM of 5x5 matrices runs one 32x32 tile each."""
    size = A.shape[-1]
    V = torch.eye(size, dtype=A.dtype, device=A.device).expand_as(A).clone()
    plans = [_plan(size, P, Q) for P, Q in _rounds(size, A.device)] if size > 1 else []
    one = torch.ones(*A.shape[:-2], 1, dtype=A.dtype, device=A.device)  # a bye's c, and (zero) its s
    zero = torch.zeros_like(one)
    for _ in range(SWEEPS if sweeps is None else sweeps):
        for at, partner, slot in plans:
            app, aqq, apq = A.flatten(-2).index_select(-1, at).chunk(3, -1)
            nonzero = apq != 0
            theta = (aqq - app) / (2 * torch.where(nonzero, apq, 1.0))
            t = torch.where(theta >= 0, 1.0, -1.0) / (theta.abs() + torch.sqrt(1 + theta * theta))
            t = torch.where(nonzero, t, 0.0)  # theta is inf/nan where apq = 0: no rotation
            c = torch.rsqrt(1 + t * t)
            s = t * c
            cv = torch.cat([c, c, one], -1).index_select(-1, slot)
            sv = torch.cat([-s, s, zero], -1).index_select(-1, slot)
            A = torch.addcmul(cv.unsqueeze(-1) * A, sv.unsqueeze(-1), A.index_select(-2, partner))
            A = torch.addcmul(A * cv.unsqueeze(-2), A.index_select(-1, partner), sv.unsqueeze(-2))
            V = torch.addcmul(V * cv.unsqueeze(-2), V.index_select(-1, partner), sv.unsqueeze(-2))
    lam, order = torch.diagonal(A, dim1=-2, dim2=-1).sort(-1)
    return lam, torch.take_along_dim(V, order.unsqueeze(-2), -1)
