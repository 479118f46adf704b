"""Batched symmetric eigen-decomposition of many small matrices without a host synchronisation.

``torch.linalg.eigh`` checks its LAPACK/cuSOLVER status on CUDA (a synchronisation: there is no
``eigh_ex``), and per-matrix solver launches do not batch well for thousands of 5x5 problems.
Cyclic Jacobi does: each round rotates disjoint index pairs of every matrix at once (a
round-robin "tournament" ordering), as gathers and elementwise products (``eigh``), so the work is a
fixed sequence of batched ops, the same on every device, with no data-dependent branch (a pair
already zero rotates by the identity).
Jacobi is accurate to a few ulps of ``|A|`` per eigenvalue; a fixed number of sweeps suffices
because convergence is quadratic once the off-diagonal part is small. How many grows with the size:
``sweeps`` gives at least one more than the most that any measured refresh-shaped problem needed
(``docs/performance.md`` 35; ``tests/test_device_step.py::test_jacobi_eigh_matches_lapack`` checks it).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["eigh", "sweeps"]


def sweeps(size: int) -> int:
    """Sweeps to float64 rounding for ``size x size`` problems, at least one to spare. The most that refresh-shaped
    ``K`` needed (old eigenvalues spanning up to twelve decades; ``docs/performance.md`` 35): size 3 needs 4, 5 needs
    6, 7 needs 7, 9-13 need 9, 17 needs 10, 33 needs 13, 65 needs 15: ``size + 1`` while small, then a logarithmic
    growth."""
    return min(size + 2, 9 + math.ceil(math.log2(max(size, 2))))


def _plan(size: int, device) -> tuple[Tensor, Tensor, Tensor]:
    """Every round's indices, one row per round, built by index arithmetic on the device (no host-built tensor to
    copy). The circle method pairs ``0..size-1`` in ``size - 1`` (even) or ``size`` (odd) rounds of disjoint pairs
    ``(P[i], Q[i])``, every pair once; an odd size gets a bye (the padded player ``fixed`` is not real, so each
    round's left-over index meets itself). Per round: the flat indices of ``A[p, p]``, ``A[q, q]`` and ``A[p, q]``;
    each row's partner in ``[A; V^T]`` (itself for a bye); each row's slot of ``c`` and of ``s`` in
    ``[c | c | 1 | -s | s | 0]``."""
    players = size + size % 2
    fixed = players - 1
    r = torch.arange(players - 1, device=device).unsqueeze(1)
    i = torch.arange(1, players // 2, device=device)
    P, Q = (r + i) % fixed, (r - i) % fixed
    if fixed < size:  # the fixed player is real: it meets player r
        P, Q = torch.cat([P, r], 1), torch.cat([Q, torch.full_like(r, fixed)], 1)
    h = P.shape[1]
    at = torch.cat([P * (size + 1), Q * (size + 1), P * size + Q], 1)
    index = torch.arange(size, device=device).expand(len(r), size)
    partner = index.scatter(1, P, Q).scatter(1, Q, P)
    pairs = torch.arange(h, device=device).expand_as(P)
    slot = torch.full_like(index, 2 * h).scatter(1, P, pairs).scatter(1, Q, pairs + h)
    return at, torch.cat([partner, partner + size], 1), torch.cat([slot, slot, slot + 2 * h + 1, slot + 2 * h + 1], 1)


def _rotate_rows(M: Tensor, c: Tensor, s: Tensor, partner: Tensor, out: Tensor | None = None) -> Tensor:
    """``J^T M``: row ``i`` becomes ``c[i] M[i] + s[i] M[partner[i]]`` (``s`` carries the rotation's sign per row).
    ``out`` may be ``M`` itself, or a view of it: the products are taken before the write."""
    return torch.addcmul(c.unsqueeze(-1) * M, s.unsqueeze(-1), M.index_select(-2, partner), out=out)


_CPU_PIECE = 4096  # matrices per piece on CPU, where a piece's ops then run in cache (docs/performance.md 36)


def eigh(A: Tensor, n_sweeps: int | None = None) -> tuple[Tensor, Tensor]:
    """``(lam, V)`` of symmetric ``A`` ``(..., N, N)``: ascending eigenvalues and orthonormal eigenvectors (columns).
    On CPU, in pieces of ``_CPU_PIECE`` matrices: 100,000 5x5 problems at once ran about 3.5x slower than in pieces.
    ``n_sweeps`` overrides ``sweeps(N)`` (for measuring how many are needed)."""
    batch = math.prod(A.shape[:-2])
    if A.device.type != "cpu" or batch <= _CPU_PIECE:
        return _eigh(A, n_sweeps)
    parts = [_eigh(a, n_sweeps) for a in A.reshape(batch, *A.shape[-2:]).split(_CPU_PIECE)]
    return torch.cat([p[0] for p in parts]).reshape(A.shape[:-1]), torch.cat([p[1] for p in parts]).reshape(A.shape)


def _eigh(A: Tensor, n_sweeps: int | None) -> tuple[Tensor, Tensor]:
    """Cyclic Jacobi on the whole batch.

    A rotation of the pairs ``(p, q)`` by ``J`` (``J[p, p] = J[q, q] = c``, ``J[p, q] = -J[q, p] = s``) mixes only rows
    and columns ``p`` and ``q``: ``(J^T A)[p] = c A[p] - s A[q]`` and ``(J^T A)[q] = s A[p] + c A[q]``. So a round is a
    gather of partner rows and two elementwise products, not a matrix product (on a GPU a batched GEMM of 5x5
    matrices runs one 32x32 tile each), and it rotates rows only: ``J^T A J = J^T (J^T A)^T`` for symmetric ``A``,
    so the second rotation goes through ``(J^T A)^T`` stacked on ``V^T``, one op for both. The angle is the smaller
    of the two that zero ``A[p, q]``: ``tan(2 phi) = 2 A[p, q] / (A[q, q] - A[p, p])``, ``|phi| <= pi / 4``."""
    size = A.shape[-1]
    X = torch.cat([A, torch.eye(size, dtype=A.dtype, device=A.device).expand_as(A)], -2)  # [A; V^T]
    if size > 1:
        at, partner, slot = _plan(size, A.device)
        one = torch.ones(*A.shape[:-2], 1, dtype=A.dtype, device=A.device)  # a bye's c, and (zero) its s
        zero = torch.zeros_like(one)
        for _ in range(sweeps(size) if n_sweeps is None else n_sweeps):
            for r in range(len(at)):
                A = X.narrow(-2, 0, size)
                app, aqq, apq = A.flatten(-2).index_select(-1, at.select(0, r)).chunk(3, -1)
                ratio = torch.nan_to_num(apq / (aqq - app), nan=0.0)  # 0 / 0 where the pair is diagonal already
                phi = 0.5 * torch.atan(2 * ratio)
                c, s = torch.cos(phi), torch.sin(phi)
                cs = torch.cat([c, c, one, -s, s, zero], -1).index_select(-1, slot.select(0, r))
                cv, sv = cs.chunk(2, -1)
                pr = partner.select(0, r)
                # (J^T A)^T = A J in A's place, then J^T [A J; V^T] = [J^T A J; (V J)^T]
                _rotate_rows(A, cv.narrow(-1, 0, size), sv.narrow(-1, 0, size), pr.narrow(0, 0, size), out=A.mT)
                X = _rotate_rows(X, cv, sv, pr)
    lam, order = torch.diagonal(X.narrow(-2, 0, size), dim1=-2, dim2=-1).sort(-1)
    return lam, torch.take_along_dim(X.narrow(-2, size, size).mT, order.unsqueeze(-2), -1)
