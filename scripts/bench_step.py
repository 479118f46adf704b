"""Time ``optimizer.step()`` side by side: Ginger's step paths against its normal refresh step, and AdamW.

(a) T5-small shapes (``T5Config()`` defaults, 60.5M parameters, float32): fused AdamW, Ginger
    recommended (row blocks) and paper (whole tensors), refresh steps (``curvature_interval=1``)
    and keep steps (``curvature_interval=10**6``), each after a filled curvature model; and the
    torch ops dispatched per ``step()`` (on CUDA: kernels launched), beside fused and foreach AdamW's.
(b) The degenerate refreshes against the normal refresh step of the same parameters, all of them
    refresh steps: a curvature vector that repeats the previous one (so it lies in span(U)), a
    zero vector, one within 1e-3 and 1e-7 of span(U), a non-finite one (the refresh is skipped),
    and blocks with d <= tau (a [4096, 4] tensor in row blocks); plus the paths that are not the
    C++ kernel (the eager torch backend, and whole-tensor blocks).
(c) Rank: tau in 1..32 on a 4M-element tensor (one block, and 4096 row blocks), each against tau=8.

Every configuration of a table is timed in alternation with the others, one step at a time, and
the median is reported with its ratio to the table's reference (the machine may be shared).
Limits from the issue tracker are printed beside the ratios they bound.

    python scripts/bench_step.py                   # all three tables (a few minutes on 2 cores)
    python scripts/bench_step.py --only b          # one table
    python scripts/bench_step.py --tiny            # small shapes: a dry run in seconds
    python scripts/bench_step.py --only a --device cuda   # on a GPU (kernel launches counted)
    python scripts/bench_step.py --json out.json   # also write the medians
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ginger_hf import Ginger, kernel

REFRESH, KEEP = 1, 10**6  # curvature_interval of a row that times refresh steps / keep steps
FILL = 5  # refresh steps before timing: tau 4 needs 4 to fill its model

def t5_small_shapes(tiny: bool = False) -> list[tuple[int, ...]]:
    from transformers import T5Config, T5ForConditionalGeneration

    config = T5Config(vocab_size=512, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4) if tiny else T5Config()
    with torch.device("meta"):
        model = T5ForConditionalGeneration(config)
    return [tuple(p.shape) for p in model.parameters()]


class Case:
    """One optimizer on its own parameters, with a rule for the curvature vector of each step.

    A Ginger case first takes ``FILL`` refresh steps (a filled curvature model), then steps with its
    ``curvature_interval`` set to ``interval``: ``REFRESH`` times refresh steps only, ``KEEP`` keep steps only."""

    def __init__(self, shapes, make_opt, curvature="fresh", seed=0, interval=REFRESH, device="cpu"):
        self.device = torch.device(device)
        self.gen = torch.Generator(self.device).manual_seed(seed)  # on a GPU, the inputs are drawn there
        self.params = [torch.nn.Parameter(self.randn(s)) for s in shapes]
        self.opt = make_opt(self.params)
        self.curvature = curvature
        self.last = None
        ginger = isinstance(self.opt, Ginger)
        for group in self.opt.param_groups if ginger else ():
            group["curvature_interval"] = REFRESH
        for _ in range(FILL):
            self.feed("fresh")
            self.opt.step()
        for group in self.opt.param_groups if ginger else ():
            group["curvature_interval"] = interval

    def randn(self, shape):
        return torch.randn(shape, generator=self.gen, device=self.device)

    def feed(self, rule=None):
        rule = rule or self.curvature
        fresh = [self.randn(p.shape) for p in self.params]
        for p in self.params:
            p.grad = self.randn(p.shape)
        if not isinstance(self.opt, Ginger) or not self.opt.needs_curvature():
            return
        if rule == "repeated" and self.last is not None:
            vectors = [c.clone() for c in self.last]
        elif rule == "zero":
            vectors = [torch.zeros_like(p) for p in self.params]
        elif rule == "nan":
            vectors = [c.index_fill_(0, torch.tensor([0], device=self.device), float("nan")) for c in fresh]
        elif rule.startswith("span"):
            vectors = [self.in_span(p, c, float(rule[4:])) for p, c in zip(self.params, fresh)]
        else:
            vectors = fresh
        self.last = vectors
        for p, c in zip(self.params, vectors):
            p.curvature = c

    def in_span(self, p, noise, residual):
        st = self.opt.state[p]
        B, n = st["s"].shape
        U = st["U"].reshape(n, B, -1).transpose(0, 1)
        inside = (U.mT @ self.randn((B, n, 1)))[..., 0]
        noise = noise.reshape(B, -1)
        return (inside + residual * inside.norm(dim=1, keepdim=True) * noise / noise.norm(dim=1, keepdim=True)).view(p.shape)

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_step(self) -> float:
        self.feed()
        self.sync()
        start = time.perf_counter()
        self.opt.step()
        self.sync()
        return time.perf_counter() - start

    def launches(self) -> int:
        """Torch ops dispatched by one ``step()`` (on CUDA: kernels launched, from the profiler)."""
        self.feed()
        self.sync()
        if self.device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                self.opt.step()
                self.sync()
            return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
        with _CountOps() as counter:
            self.opt.step()
        return counter.count


class _CountOps(TorchDispatchMode):
    """Counts the aten ops dispatched while active (foreach ops count once, as one dispatch)."""

    count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


def table(cases: dict[str, Case], reference: str, steps: int, limits: dict[str, float] | None = None,
          launches: dict[str, int] | None = None) -> dict:
    times = {name: [] for name in cases}
    for _ in range(steps):
        for name, case in cases.items():
            times[name].append(case.time_step())
    base = statistics.median(times[reference])
    counted = launches is not None
    print(f"\n{'path':44s} {'ms':>9s} {'ratio':>7s} {'limit':>6s}" + (f" {'ops/step':>9s}" if counted else ""))
    out = {}
    for name in {**times, **(launches or {})}:
        ts = times.get(name)
        med = statistics.median(ts) if ts else float("nan")
        limit = (limits or {}).get(name)
        out[name] = dict(ms=med * 1e3, ratio=med / base, limit=limit)
        flag = "" if limit is None else (" ok" if med / base <= limit else " OVER")
        count = ""
        if counted:
            out[name]["launches"] = launches.get(name)
            count = f" {launches[name]:9d}" if name in launches else ""
        ms = f"{med * 1e3:9.2f} {med / base:7.2f}" if ts else f"{'-':>9s} {'-':>7s}"
        print(f"{name:44s} {ms} {limit if limit else '':>6}{flag:3s}{count}")
    return out


def ginger(**kw):
    return lambda params: Ginger(params, lr=1e-3, **kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("a", "b", "c"), default=None)
    p.add_argument("--steps", type=int, default=7, help="timed steps per configuration (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="where the parameters live (cpu, cuda, ...)")
    p.add_argument("--tiny", action="store_true", help="small shapes: a dry run that finishes in seconds")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = min(a.steps, 3) if a.tiny else a.steps
    dev = a.device
    print(f"torch {torch.__version__}, device {dev}, {torch.get_num_threads()} threads, C++ kernel: "
          f"{kernel.available()}, load average {os.getloadavg()[0]:.2f}")
    results = {}
    if a.only in (None, "a"):
        shapes = t5_small_shapes(a.tiny)
        print(f"\n(a) T5-small shapes{' (tiny)' if a.tiny else ''}: {len(shapes)} tensors, "
              f"{sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M; refresh rows: every step a refresh; "
              "keep rows: none")
        adamw = dict(lr=1e-3, fused=True) if dev == "cpu" or dev.startswith("cuda") else dict(lr=1e-3)
        cases = {
            "adamw fused": Case(shapes, lambda ps: torch.optim.AdamW(ps, **adamw), device=dev),
            "ginger recommended, refresh": Case(shapes, ginger(), interval=REFRESH, device=dev),
            "ginger recommended, keep": Case(shapes, ginger(), interval=KEEP, device=dev),
            "ginger paper, refresh": Case(shapes, ginger(preset="paper"), interval=REFRESH, device=dev),
            "ginger paper, keep": Case(shapes, ginger(preset="paper"), interval=KEEP, device=dev),
        }
        if dev != "cpu":  # off the CPU, the device step's passes compiled by torch.compile too
            for step, interval in (("refresh", REFRESH), ("keep", KEEP)):
                cases[f"ginger recommended, {step}, compile"] = Case(shapes, ginger(backend="compile"),
                                                                     interval=interval, device=dev)
        launches = {name: case.launches() for name, case in cases.items()}
        foreach = Case(shapes, lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), device=dev)
        launches["adamw foreach (not timed)"] = foreach.launches()
        del foreach
        limits = {name: 2.5 for name in cases if name.startswith("ginger recommended")}
        results["a"] = table(cases, "adamw fused", max(3, steps // 2), limits, launches)
    if a.only in (None, "b"):
        shapes = [(4096, 256), (256, 1024), (1024,), (4096, 4)]  # rows of 256 and 1024, a vector, d <= tau rows
        if a.tiny:
            shapes = [(256, 64), (64, 128), (128,), (256, 4)]
        print("\n(b) degenerate refreshes against the normal refresh step, every step a refresh (row blocks, tau 4; "
              "the last tensor has d <= tau in every row)")
        limits = {name: 1.5 for name in ("repeated gradient", "zero curvature", "within 1e-3 of span(U)",
                                          "within 1e-7 of span(U)", "non-finite curvature (refresh skipped)")}
        results["b"] = table({
            "normal refresh": Case(shapes, ginger(), device=dev),
            "repeated gradient": Case(shapes, ginger(), "repeated", device=dev),
            "zero curvature": Case(shapes, ginger(), "zero", device=dev),
            "within 1e-3 of span(U)": Case(shapes, ginger(), "span1e-3", device=dev),
            "within 1e-7 of span(U)": Case(shapes, ginger(), "span1e-7", device=dev),
            "non-finite curvature (refresh skipped)": Case(shapes, ginger(), "nan", device=dev),
            "eager torch backend (no C++ kernel)": Case(shapes, ginger(backend="torch"), device=dev),
            "whole-tensor blocks": Case(shapes, ginger(blocks="tensor"), device=dev),
        }, "normal refresh", steps, limits)
    if a.only in (None, "c"):
        print("\n(c) rank: a 4M-element tensor, refresh steps, against tau=8")
        size, rows = (64 * 1024, 256) if a.tiny else (4 * 1024 * 1024, 4096)
        for blocks, shape in (("tensor", (size,)), ("row", (rows, size // rows))):
            ranks = [1, 4, 8, 10, 12, 16, 32]
            cases = {f"{blocks} blocks, tau={t}": Case([shape], ginger(tau=t, blocks=blocks), device=dev) for t in ranks}
            results[f"c-{blocks}"] = table(cases, f"{blocks} blocks, tau=8", steps,
                                           {f"{blocks} blocks, tau=10": 1.6})
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
