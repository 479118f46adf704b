"""Micro-timings on a GPU behind docs/performance.md 28-29 and 34: pass 1's sums, pass 2's products, the small
products, the eigen-solvers.

Each line is the median of timings after three warm-up calls (CUDA events on a GPU). About a minute and a half
on a GPU, most of it compiling the Jacobi solver. ``--device cpu --tiny`` runs every line at tiny sizes without
the compile (``scripts/gpu_check.sh --dry-run``).

    python scripts/gpu_micro.py
"""

from __future__ import annotations

import argparse
import time

import torch

from ginger_hf import symeig


def bench(name: str, fn, device: str, reps: int = 20) -> None:
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    print(f"{name:60s} {sorted(times)[reps // 2] * 1e6:9.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="small sizes, no compile: a check that every line runs")
    args = parser.parse_args()
    dev = args.device
    assert dev != "cuda" or torch.cuda.is_available(), "gpu_micro.py needs a CUDA device (or --device cpu --tiny)"
    B, k, N = (64, 32, 500) if args.tiny else (8192, 512, 100_000)
    U, m = torch.randn(4, B, k, device=dev), torch.randn(B, k, device=dev)
    mv, Ud = m.double(), U.double()
    print(f"pass-1 sums, U: 4 x {B} x {k} float32")
    bench("um: einsum on U.double() (before)", lambda: torch.einsum("ibk,bk->bi", U.double(), mv), dev)
    bench("um: (U * mv_double).sum(-1) (device_step._pass1_rows)", lambda: (U * mv).sum(-1), dev)
    bench("um: einsum float32 (not the precision contract)", lambda: torch.einsum("ibk,bk->bi", U, m), dev)
    bench("U.double() alone", lambda: U.double(), dev)
    bench("gram: einsum ibk,jbk->bij on U.double() (kept)", lambda: torch.einsum("ibk,jbk->bij", Ud, Ud), dev)
    bench("gram: bmm", lambda: torch.bmm(Ud.transpose(0, 1), Ud.transpose(0, 1).mT), dev)
    bench("gram: broadcast product and sum", lambda: (Ud.unsqueeze(1) * Ud.unsqueeze(0)).sum(-1), dev)
    a = torch.randn(B, 4, device=dev)
    print(f"pass-2 products sum_i a[b, i] U[i, b, :], U: 4 x {B} x {k} float32")
    bench("einsum ibk,bi->bk (device_step._pass2_rows: a bmm)", lambda: torch.einsum("ibk,bi->bk", U, a), dev)
    bench("broadcast product and sum", lambda: (U * a.T.unsqueeze(-1)).sum(0), dev)
    A = torch.randn(N, 5, 5, device=dev, dtype=torch.float64)
    A = A + A.mT
    print(f"small problems: {N} x 5 x 5 float64")
    bench("batched GEMM A @ A (before)", lambda: A @ A, dev)
    bench("broadcast product and sum (solve._mm)", lambda: (A.unsqueeze(-1) * A.unsqueeze(-3)).sum(-2), dev)
    bench(f"symeig.eigh ({symeig.sweeps(5)} sweeps)", lambda: symeig.eigh(A), dev, reps=5)
    try:
        bench("torch.linalg.eigh (synchronises)", lambda: torch.linalg.eigh(A), dev, reps=5)
    except RuntimeError as exc:
        print(f"torch.linalg.eigh failed: {str(exc)[:200]}")
    if not args.tiny:
        compiled = torch.compile(symeig.eigh)
        bench("torch.compile(symeig.eigh) (not kept: 60-75 s to compile on CPU)", lambda: compiled(A), dev, reps=5)


if __name__ == "__main__":
    main()
