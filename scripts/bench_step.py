"""Time ``optimizer.step()`` side by side: Ginger's step paths against its normal refresh step, and AdamW.

(a) T5-small shapes (``T5Config()`` defaults, 60.5M parameters, float32): fused AdamW, Ginger
    recommended (row blocks) and paper (whole tensors), refresh steps and keep steps.
(b) The degenerate refreshes against the normal refresh step of the same parameters: a
    curvature vector that repeats the previous one (so it lies in span(U)), a zero vector,
    one within 1e-3 and 1e-7 of span(U), a non-finite one (the refresh is skipped), and
    blocks with d <= tau (a [4096, 4] tensor in row blocks); plus the paths that are not the
    C++ kernel (the eager torch backend, and a rank above the kernel's).
(c) Rank: tau in 1..32 on a 4M-element tensor (one block, and 4096 row blocks), each against tau=8.

Every configuration of a table is timed in alternation with the others, one step at a
time, and the median is reported with its ratio to the table's reference (the machine may
be shared). Limits from the issue tracker are printed beside the ratios they bound.

    python scripts/bench_step.py                   # all three tables (a few minutes on 2 cores)
    python scripts/bench_step.py --only b          # one table
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

from ginger_hf import Ginger, kernel


def t5_small_shapes() -> list[tuple[int, ...]]:
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config())
    return [tuple(p.shape) for p in model.parameters()]


class Case:
    """One optimizer on its own parameters, with a rule for the curvature vector of each step."""

    def __init__(self, shapes, make_opt, curvature="fresh", seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
        self.opt = make_opt(self.params)
        self.curvature = curvature
        self.gen = gen
        self.last = None
        for _ in range(3):  # a filled curvature model first
            self.feed("fresh")
            self.opt.step()

    def feed(self, rule=None):
        rule = rule or self.curvature
        fresh = [torch.randn(p.shape, generator=self.gen) for p in self.params]
        for p, g in zip(self.params, fresh):
            p.grad = torch.randn(p.shape, generator=self.gen)
        if not isinstance(self.opt, Ginger) or not self.opt.needs_curvature():
            return
        if rule == "repeated" and self.last is not None:
            vectors = [c.clone() for c in self.last]
        elif rule == "zero":
            vectors = [torch.zeros_like(p) for p in self.params]
        elif rule == "nan":
            vectors = [c.index_fill_(0, torch.tensor([0]), float("nan")) for c in fresh]
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
        inside = (U.mT @ torch.randn(B, n, 1, generator=self.gen))[..., 0]
        noise = noise.reshape(B, -1)
        return (inside + residual * inside.norm(dim=1, keepdim=True) * noise / noise.norm(dim=1, keepdim=True)).view(p.shape)

    def time_step(self) -> float:
        self.feed()
        start = time.perf_counter()
        self.opt.step()
        return time.perf_counter() - start


def table(cases: dict[str, Case], reference: str, steps: int, limits: dict[str, float] | None = None) -> dict:
    times = {name: [] for name in cases}
    for _ in range(steps):
        for name, case in cases.items():
            times[name].append(case.time_step())
    base = statistics.median(times[reference])
    print(f"\n{'path':44s} {'ms':>9s} {'ratio':>7s} {'limit':>6s}")
    out = {}
    for name, ts in times.items():
        med = statistics.median(ts)
        limit = (limits or {}).get(name)
        out[name] = dict(ms=med * 1e3, ratio=med / base, limit=limit)
        flag = "" if limit is None else (" ok" if med / base <= limit else " OVER")
        print(f"{name:44s} {med * 1e3:9.2f} {med / base:7.2f} {limit if limit else '':>6}{flag}")
    return out


def ginger(**kw):
    return lambda params: Ginger(params, lr=1e-3, **kw)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=("a", "b", "c"), default=None)
    p.add_argument("--steps", type=int, default=7, help="timed steps per configuration (median)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, C++ kernel: {kernel.available()}, "
          f"load average {os.getloadavg()[0]:.2f}")
    results = {}
    if a.only in (None, "a"):
        shapes = t5_small_shapes()
        print(f"\n(a) T5-small shapes: {len(shapes)} tensors, {sum(torch.Size(s).numel() for s in shapes) / 1e6:.1f}M")
        results["a"] = table({
            "adamw fused": Case(shapes, lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
            "ginger recommended, refresh": Case(shapes, ginger()),
            "ginger recommended, keep (interval 1000)": Case(shapes, ginger(curvature_interval=1000)),
            "ginger paper, refresh": Case(shapes, ginger(preset="paper")),
            "ginger paper, keep (interval 1000)": Case(shapes, ginger(preset="paper", curvature_interval=1000)),
        }, "adamw fused", max(3, a.steps // 2))
    if a.only in (None, "b"):
        shapes = [(4096, 256), (256, 1024), (1024,), (4096, 4)]  # rows of 256 and 1024, a vector, d <= tau rows
        print("\n(b) degenerate refreshes against the normal refresh step (row blocks, tau 4; a [4096, 4] tensor "
              "has d <= tau in every row)")
        limits = {name: 1.5 for name in ("repeated gradient", "zero curvature", "within 1e-3 of span(U)",
                                          "within 1e-7 of span(U)", "non-finite curvature (refresh skipped)")}
        results["b"] = table({
            "normal refresh": Case(shapes, ginger()),
            "repeated gradient": Case(shapes, ginger(), "repeated"),
            "zero curvature": Case(shapes, ginger(), "zero"),
            "within 1e-3 of span(U)": Case(shapes, ginger(), "span1e-3"),
            "within 1e-7 of span(U)": Case(shapes, ginger(), "span1e-7"),
            "non-finite curvature (refresh skipped)": Case(shapes, ginger(), "nan"),
            "eager torch backend (no C++ kernel)": Case(shapes, ginger(backend="torch")),
            "whole-tensor blocks": Case(shapes, ginger(blocks="tensor")),
        }, "normal refresh", a.steps, limits)
    if a.only in (None, "c"):
        print("\n(c) rank: a 4M-element tensor, refresh steps, against tau=8")
        for blocks, shape in (("tensor", (4 * 1024 * 1024,)), ("row", (4096, 1024))):
            ranks = [1, 4, 8, 10, 12, 16, 32]
            cases = {f"{blocks} blocks, tau={t}": Case([shape], ginger(tau=t, blocks=blocks)) for t in ranks}
            results[f"c-{blocks}"] = table(cases, f"{blocks} blocks, tau=8", a.steps,
                                           {f"{blocks} blocks, tau=10": 1.6})
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
