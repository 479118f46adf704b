"""Micro-timings on a GPU behind docs/performance.md 28-29: pass 1's sums, the small products, the eigen-solvers.

Each line is the median of CUDA-event timings after three warm-up calls. Needs CUDA; about a minute and a half,
most of it compiling the Jacobi solver.

    python scripts/gpu_micro.py
"""

from __future__ import annotations

import torch

from ginger_hf import symeig


def bench(name: str, fn, reps: int = 20) -> None:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    print(f"{name:60s} {sorted(times)[reps // 2] * 1e3:9.1f} us")


def main() -> None:
    assert torch.cuda.is_available(), "gpu_micro.py needs a CUDA device"
    U, m = torch.randn(4, 8192, 512, device="cuda"), torch.randn(8192, 512, device="cuda")
    mv, Ud = m.double(), U.double()
    print("pass-1 sums, U: 4 x 8192 x 512 float32")
    bench("um: einsum on U.double() (before)", lambda: torch.einsum("ibk,bk->bi", U.double(), mv))
    bench("um: (U * mv_double).sum(-1) (device_step._pass1_rows)", lambda: (U * mv).sum(-1))
    bench("um: einsum float32 (not the precision contract)", lambda: torch.einsum("ibk,bk->bi", U, m))
    bench("U.double() alone", lambda: U.double())
    bench("gram: einsum ibk,jbk->bij on U.double() (kept)", lambda: torch.einsum("ibk,jbk->bij", Ud, Ud))
    bench("gram: bmm", lambda: torch.bmm(Ud.transpose(0, 1), Ud.transpose(0, 1).mT))
    bench("gram: broadcast product and sum", lambda: (Ud.unsqueeze(1) * Ud.unsqueeze(0)).sum(-1))
    A = torch.randn(100_000, 5, 5, device="cuda", dtype=torch.float64)
    A = A + A.mT
    print("small problems: 100000 x 5 x 5 float64")
    bench("batched GEMM A @ A (before)", lambda: A @ A)
    bench("broadcast product and sum (solve._mm)", lambda: (A.unsqueeze(-1) * A.unsqueeze(-3)).sum(-2))
    bench(f"symeig.eigh ({symeig.sweeps(5)} sweeps)", lambda: symeig.eigh(A), reps=5)
    try:
        bench("torch.linalg.eigh (synchronises)", lambda: torch.linalg.eigh(A), reps=5)
    except RuntimeError as exc:
        print(f"torch.linalg.eigh failed: {str(exc)[:200]}")
    compiled = torch.compile(symeig.eigh)
    bench("torch.compile(symeig.eigh) (not kept: 60-75 s to compile)", lambda: compiled(A), reps=5)


if __name__ == "__main__":
    main()
