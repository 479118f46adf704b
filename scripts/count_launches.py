"""Ops dispatched (fake device / CPU) or CUDA kernels launched (a real GPU) per optimizer step, Ginger beside
torch's foreach AdamW, on T5-small's parameter shapes (or a handful with --tiny).

In fake mode and on CPU, foreach ops are decomposed per tensor, so a count there grows with the number of
tensors for AdamW too: only the comparison of the two columns means something. On CUDA the profiler counts
kernels, where foreach ops are a few launches per group of tensors; there each optimizer also takes one step
under ``torch.cuda.set_sync_debug_mode("error")`` (any host synchronisation raises) and prints its top kernels.

    python scripts/count_launches.py                 # fake cuda device: dispatched ops per step
    python scripts/count_launches.py --device cuda   # a GPU: kernels per step (torch.profiler)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_step import t5_small_shapes  # noqa: E402

from ginger_hf import Ginger, symeig  # noqa: E402

TINY = [(64, 32), (32, 64), (32,), (100, 32)]


class CountOps(TorchDispatchMode):
    """Counts dispatched ops that compute (a kernel on a GPU): views and metadata queries launch nothing."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aten" and not func.is_view:
            self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def make(name: str, params):
    if name == "adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    interval = {"ginger_refresh": 1, "ginger_keep": 10**6}[name]
    return Ginger(params, lr=1e-3, curvature="empirical", curvature_interval=interval)


def count(name: str, shapes, device: str, profile: bool) -> int:
    params = [torch.nn.Parameter(torch.randn(s, device=device)) for s in shapes]
    opt = make(name, params)
    for p in params:
        p.grad = torch.randn(p.shape, device=device)
    opt.step()  # creates the state; for ginger_keep, the one refresh
    for p in params:
        p.grad = torch.randn(p.shape, device=device)
    if profile:  # a real GPU
        opt.step()  # a second warm step; then one under CUDA's sync check: any host synchronisation raises
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
            print(f"{name}: a step ran under torch.cuda.set_sync_debug_mode('error'): no host synchronisation")
        except RuntimeError as exc:
            print(f"{name}: a step synchronised with the host: {str(exc).splitlines()[0]}")
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            opt.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    with CountOps() as counter:
        opt.step()
    return sum(counter.ops.values())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("fake", "cpu", "cuda"), default="fake")
    p.add_argument("--tiny", action="store_true", help="four small tensors instead of T5-small's shapes")
    a = p.parse_args(argv)
    shapes = TINY if a.tiny else t5_small_shapes()
    device = "cuda" if a.device in ("fake", "cuda") else "cpu"
    mode = torch._subclasses.fake_tensor.FakeTensorMode() if a.device == "fake" else contextlib.nullcontext()
    unit = "kernels" if a.device == "cuda" else "dispatched compute ops (no views)"
    print(f"{len(shapes)} tensors ({sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M parameters), "
          f"device {a.device}: {unit} per step")
    rows = {}
    with mode:
        for name in ("adamw_foreach", "ginger_keep", "ginger_refresh"):
            rows[name] = count(name, shapes, device, profile=a.device == "cuda")
    for name, n in rows.items():
        print(f"{name:24s} {n:8d}  {n / rows['adamw_foreach']:6.2f}x foreach AdamW")
    if a.device != "cuda":  # the refresh's fixed share, whatever the number of tensors
        with mode:
            K = torch.zeros(64, 5, 5, dtype=torch.float64, device=device)
            with CountOps() as counter:
                symeig.eigh(K)
        print(f"of which the Jacobi eigen-solve at tau 4 (5 x 5): {sum(counter.ops.values())}")
    return rows


if __name__ == "__main__":
    main()
