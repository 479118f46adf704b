"""Batched symmetric eigen-decomposition of many small matrices without a host synchronisation.

``torch.linalg.eigh`` checks its LAPACK/cuSOLVER status on CUDA (a synchronisation: there is no
``eigh_ex``), and per-matrix solver launches do not batch well for thousands of 5x5 problems.
Cyclic Jacobi does: each round rotates disjoint index pairs of every matrix at once (a
round-robin "tournament" ordering), as two batched products with a rotation matrix assembled
from constant one-hot patterns, so the work is a fixed sequence of dense batched ops, the same
on every device, with no data-dependent branch (a pair already zero rotates by the identity).
Jacobi is accurate to a few ulps of ``|A|`` per eigenvalue; a fixed number of sweeps suffices
because convergence is quadratic once the off-diagonal part is small (``SWEEPS`` is chosen by
``tests/test_solve.py::test_jacobi_matches_eigh`` on random, tied and deflated problems).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

__all__ = ["eigh"]

SWEEPS = 8


@functools.lru_cache(maxsize=None)
def _rounds(size: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Round-robin pairings of ``0..size-1``: every pair once, each round a set of disjoint pairs."""
    players = list(range(size + size % 2))  # an odd size gets a bye (the padded index)
    rounds = []
    for _ in range(len(players) - 1):
        half = len(players) // 2
        pairs = [(min(a, b), max(a, b)) for a, b in zip(players[:half], reversed(players[half:])) if max(a, b) < size]
        rounds.append(tuple(pairs))
        players = [players[0], players[-1], *players[1:-1]]
    return tuple(rounds)


def _patterns(size: int, pairs, dtype, device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Index vectors of a round's pairs and the one-hot patterns of their rotation: diagonal and skew parts."""
    P = torch.tensor([p for p, _ in pairs], device=device)
    Q = torch.tensor([q for _, q in pairs], device=device)
    eye = torch.eye(size, dtype=dtype, device=device)
    diag = eye[P][:, :, None] * eye[P][:, None, :] + eye[Q][:, :, None] * eye[Q][:, None, :]
    skew = eye[P][:, :, None] * eye[Q][:, None, :] - eye[Q][:, :, None] * eye[P][:, None, :]
    return P, Q, diag, skew


def eigh(A: Tensor, sweeps: int = SWEEPS) -> tuple[Tensor, Tensor]:
    """``(lam, V)`` of symmetric ``A`` ``(..., N, N)``: ascending eigenvalues and orthonormal eigenvectors (columns)."""
    size = A.shape[-1]
    eye = torch.eye(size, dtype=A.dtype, device=A.device)
    V = eye.expand_as(A).clone()
    rounds = [_patterns(size, pairs, A.dtype, A.device) for pairs in _rounds(size)]
    for _ in range(sweeps if size > 1 else 0):
        for P, Q, diag, skew in rounds:
            app, aqq, apq = A[..., P, P], A[..., Q, Q], A[..., P, Q]
            nonzero = apq != 0
            theta = (aqq - app) / (2 * torch.where(nonzero, apq, 1.0))
            t = torch.where(theta >= 0, 1.0, -1.0) / (theta.abs() + torch.sqrt(1 + theta * theta))
            t = torch.where(nonzero, t, 0.0)  # theta is inf/nan where apq = 0: no rotation
            c = torch.rsqrt(1 + t * t)
            J = eye + torch.einsum("...r,rij->...ij", c - 1, diag) + torch.einsum("...r,rij->...ij", t * c, skew)
            A = J.mT @ A @ J
            V = V @ J
    lam, order = torch.diagonal(A, dim1=-2, dim2=-1).sort(-1)
    return lam, torch.take_along_dim(V, order[..., None, :], -1)
