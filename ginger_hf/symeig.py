"""Batched symmetric eigen-decomposition of many small matrices without a host synchronisation.

``torch.linalg.eigh`` checks its LAPACK/cuSOLVER status on CUDA (a synchronisation: there is no
``eigh_ex``), and per-matrix solver launches do not batch well for thousands of 5x5 problems.
Cyclic Jacobi does: each round rotates disjoint index pairs of every matrix at once (a
round-robin "tournament" ordering), as two batched products with a rotation matrix assembled
from constant one-hot patterns, so the work is a fixed sequence of dense batched ops, the same
on every device, with no data-dependent branch (a pair already zero rotates by the identity).
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


def _patterns(size: int, P: Tensor, Q: Tensor, dtype) -> tuple[Tensor, Tensor, Tensor]:
    """Flat indices of ``A[p, q]``, and the one-hot patterns of a round's rotation: diagonal and skew parts."""
    eye = torch.eye(size, dtype=dtype, device=P.device)
    Ep, Eq = eye.index_select(0, P), eye.index_select(0, Q)
    outer = lambda x, y: x.unsqueeze(-1) * y.unsqueeze(-2)  # noqa: E731
    return P * size + Q, outer(Ep, Ep) + outer(Eq, Eq), outer(Ep, Eq) - outer(Eq, Ep)


def eigh(A: Tensor, sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """``(lam, V)`` of symmetric ``A`` ``(..., N, N)``: ascending eigenvalues and orthonormal eigenvectors (columns)."""
    size = A.shape[-1]
    eye = torch.eye(size, dtype=A.dtype, device=A.device)
    V = eye.expand_as(A).clone()
    rounds = [(P, Q, *_patterns(size, P, Q, A.dtype)) for P, Q in _rounds(size, A.device)] if size > 1 else []
    for _ in range(SWEEPS if sweeps is None else sweeps):
        for P, Q, pq, diag, skew in rounds:
            d = torch.diagonal(A, dim1=-2, dim2=-1)
            app, aqq, apq = d.index_select(-1, P), d.index_select(-1, Q), A.flatten(-2).index_select(-1, pq)
            nonzero = apq != 0
            theta = (aqq - app) / (2 * torch.where(nonzero, apq, 1.0))
            t = torch.where(theta >= 0, 1.0, -1.0) / (theta.abs() + torch.sqrt(1 + theta * theta))
            t = torch.where(nonzero, t, 0.0)  # theta is inf/nan where apq = 0: no rotation
            c = torch.rsqrt(1 + t * t)
            J = eye + torch.einsum("...r,rij->...ij", c - 1, diag) + torch.einsum("...r,rij->...ij", t * c, skew)
            A = J.mT @ A @ J
            V = V @ J
    lam, order = torch.diagonal(A, dim1=-2, dim2=-1).sort(-1)
    return lam, torch.take_along_dim(V, order.unsqueeze(-2), -1)
