"""How many Jacobi sweeps refresh-shaped problems need, by size: the measurement behind ``symeig.sweeps``
(docs/performance.md 35).

A refresh's eigenproblem is ``K = (1 - beta2) z z^T + diag(beta2 s, 0)``. The families: ``beta2`` 0.99 and 0.5;
old eigenvalues ``s`` spanning 0, 4 or 12 decades; ``z`` of a random overall scale (1e-2 to 1e2), its
components of one scale or spanning 6 decades. For each size, the fewest sweeps after which the worst problem of
every family is within the tolerances of ``tests/test_device_step.py::test_jacobi_eigh_matches_lapack``
(error / tolerance <= 1, printed for the sweeps around it).

    python scripts/jacobi_sweeps.py --sizes 3 5 9 --problems 20000    # minutes at size 9; hours at 65
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ginger_hf import symeig  # noqa: E402


def refresh_problems(size: int, N: int, beta2: float, s_decades: int, z_decades: int, gen) -> torch.Tensor:
    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=torch.float64)
    s = rand(N, size - 1) * 10 ** (-s_decades * rand(N, size - 1))
    z = torch.randn(N, size, generator=gen, dtype=torch.float64) * 10 ** (-z_decades * rand(N, size))
    z = z * 10 ** (4 * rand(N, 1) - 2)
    return (1 - beta2) * z[:, :, None] * z[:, None, :] + torch.diag_embed(torch.cat([beta2 * s, 0 * s[:, :1]], 1))


def worst_error(A: torch.Tensor, n_sweeps: int) -> float:
    """The largest of the test's three measures, each over its tolerance."""
    lam, V = symeig.eigh(A, n_sweeps)
    scale = torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-300)
    values = ((lam - torch.linalg.eigvalsh(A)).abs() / scale[:, None]).max() / 1e-13
    vectors = (torch.linalg.matrix_norm(A @ V - V * lam[:, None, :]) / scale).max() / 1e-12
    orthogonality = (V.mT @ V - torch.eye(A.shape[-1], dtype=A.dtype)).abs().max() / 1e-13
    return max(values.item(), vectors.item(), orthogonality.item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 9])
    parser.add_argument("--problems", type=int, default=20000, help="per family")
    parser.add_argument("--max-sweeps", type=int, default=20)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    for size in args.sizes:
        worst: dict[int, float] = {}
        for beta2 in (0.99, 0.5):
            for s_decades in (0, 4, 12):
                for z_decades in (0, 6):
                    A = refresh_problems(size, args.problems, beta2, s_decades, z_decades, gen)
                    before = float("inf")
                    for n in range(1, args.max_sweeps + 1):
                        error = worst_error(A, n)
                        worst[n] = max(worst.get(n, 0.0), error)
                        if before <= 1 and error <= 1:
                            break  # converged for this family two sweeps running: later ones stay at rounding
                        before = error
        need = min((n for n, e in worst.items() if e <= 1), default=None)
        shown = {n: f"{e:.1g}" for n, e in sorted(worst.items()) if need is None or abs(n - need) <= 2}
        print(f"size {size}: needs {need} sweeps (symeig.sweeps gives {symeig.sweeps(size)}); worst error / tolerance "
              f"by sweeps {shown}", flush=True)


if __name__ == "__main__":
    main()
