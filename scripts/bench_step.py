"""Time ``optimizer.step()``: Ginger against torch AdamW (foreach and fused) on identical parameters.

(a) The parameter shapes of T5-small (``T5Config()`` defaults, 60.5M parameters), float32
    parameters, Ginger with float32 and with bfloat16 state, on refresh steps (a curvature
    vector every step) and between refreshes.
(b) Single tensors, d in {1e5, 1e6, 1e7} x tau in {1, 4, 8, 16}: Ginger refresh step vs fused
    AdamW; fits of time against d and against tau (slopes and worst relative residual).

Every configuration is timed in alternation with the others, one step at a time, and the
median is reported (the machine may be shared). Each row prints time, ratio to fused AdamW,
the ratio of bytes read to fused AdamW's (where reads are the bottleneck, the
ratio to expect), effective GB/s (bytes that must move, see ``traffic``), and the ratio to the traffic
floor (those bytes at the measured ``copy_`` bandwidth). Peak extra memory of a step is the
rise of the process's peak RSS over its RSS before the step (CPU; /proc/self/clear_refs) or
``torch.cuda.max_memory_allocated`` (CUDA).

    python scripts/bench_step.py                 # everything (under a minute on 2 cores)
    python scripts/bench_step.py --skip-single   # T5-small shapes only
    python scripts/bench_step.py --device cuda   # on a GPU (torch.compile passes of ginger_hf.fused)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ginger_hf import Ginger, fused


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- memory -------------------------------------------------------------------------------


def _proc_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_extra_bytes(fn, device) -> int | None:
    """Peak memory a call adds above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
        base = _proc_kb("VmRSS")
        fn()
        return max(0, _proc_kb("VmHWM") - base) * 1024
    except OSError:
        return None


# -- traffic model ---------------------------------------------------------------------------


def traffic(kind: str, d: int, n: int = 0, sb: int = 4, pb: int = 4) -> tuple[int, int]:
    """Bytes that a step must (read, write) per the two-pass scheme (GINGER.md section 4, ginger_hf/fused.py).

    Ginger refresh (mc): pass 1 reads U, c, g, m (and checks finiteness on the way); pass 2
    reads U, c, g, m, p and writes U, m, p. Between refreshes: pass 1 U, g, m; pass 2 reads
    U, g, m, p, writes m, p. Fused AdamW: reads p, g, m, v, writes p, m, v. Where a core's
    read bandwidth is the limit (as on the 2-core VM), time follows the reads.
    """
    words = {  # (state words read, parameter-dtype words read, state words written, parameter words written)
        "adamw": (0, 4, 0, 3),
        "refresh": (2 * n + 2, 5, n + 1, 1),
        "nonrefresh": (2 * n + 2, 3, 1, 1),
    }[kind]
    return (words[0] * sb + words[1] * pb) * d, (words[2] * sb + words[3] * pb) * d


def copy_bandwidth(device, numel=1 << 26, reps=7) -> float:
    """Bytes/s of ``y.copy_(x)`` counting one read and one write."""
    x = torch.randn(numel, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    ts = []
    for _ in range(reps):
        sync(device)
        t = time.perf_counter()
        y.copy_(x)
        sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * 4 * numel / statistics.median(ts)


# -- steppers --------------------------------------------------------------------------------


class Stepper:
    """An optimizer on its own copy of the parameters; each step gets fresh inputs from a pool.

    Gradients cycle through a pool of random vectors. Ginger's curvature vector is a pool
    vector rolled by a step-dependent shift (untimed), i.e. a fresh direction every step, as
    in training; a few recycled vectors would soon lie in span(U) and take the rare
    reference fallback of ``ginger_hf.fused``. The stepper holds on to the vectors it hands
    over until the next ``prepare``, so their release (``step()`` drops them, as
    ``zero_grad()`` drops gradients) is not timed, like AdamW's gradients.
    """

    def __init__(self, name, shapes, make_opt, pool_grads, pool_curv, device):
        self.name = name
        self.params = [torch.nn.Parameter(torch.zeros(s, device=device)) for s in shapes]
        self.opt = make_opt(self.params)
        self.pool_grads, self.pool_curv = pool_grads, pool_curv
        self.i = 0
        self.times = []

    def prepare(self):
        k = self.i % len(self.pool_grads)
        self.handed = []  # freed here, untimed: step() drops its curvature vectors as zero_grad() drops gradients
        for j, p in enumerate(self.params):
            p.grad = self.pool_grads[k][j]
            if self.pool_curv is not None:
                c = self.pool_curv[(k + 1) % len(self.pool_curv)][j]
                p.curvature = c.reshape(-1).roll(7919 * self.i + 1).view_as(c)
                self.handed.append(p.curvature)
        self.i += 1

    def step(self):
        self.opt.step()


def timed(stepper: Stepper, device) -> float:
    stepper.prepare()
    sync(device)
    t = time.perf_counter()
    stepper.step()
    sync(device)
    return time.perf_counter() - t


def run_alternating(steppers, device, reps, warmup=2):
    for s in steppers:
        for _ in range(warmup):
            timed(s, device)
    for _ in range(reps):
        for s in steppers:
            s.times.append(timed(s, device))
    return {s.name: statistics.median(s.times) for s in steppers}


def make_pool(shapes, k, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    return [[torch.randn(s, generator=g).to(device) for s in shapes] for _ in range(k)]


# -- (a) T5-small shapes ----------------------------------------------------------------------


def t5_small_shapes():
    from transformers import T5Config, T5ForConditionalGeneration

    with torch.device("meta"):
        model = T5ForConditionalGeneration(T5Config())
    return [tuple(p.shape) for p in model.parameters()]


def bench_t5(args, device, bw):
    shapes = t5_small_shapes()
    d = sum(torch.Size(s).numel() for s in shapes)
    grads = make_pool(shapes, 3, device, 0)
    curvs = make_pool(shapes, 2, device, 1)
    tau = args.tau
    configs = [
        ("adamw fused", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), None, ("adamw", 0, 4)),
        ("ginger refresh (mc)", lambda ps: Ginger(ps, tau=tau, curvature="mc"), curvs, ("refresh", tau, 4)),
        ("ginger between refreshes", lambda ps: Ginger(ps, tau=tau, curvature="mc", curvature_interval=10**9), curvs,
         ("nonrefresh", tau, 4)),
        ("ginger refresh, bf16 state", lambda ps: Ginger(ps, tau=tau, curvature="mc", state_dtype=torch.bfloat16), curvs,
         ("refresh", tau, 2)),
    ]
    if not args.skip_foreach:
        configs.insert(1, ("adamw foreach", lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True), None, ("adamw", 0, 4)))
    steppers = []
    for name, make, cpool, _ in configs:
        steppers.append(Stepper(name, shapes, make, grads, cpool, device))
    load0 = os.getloadavg()[0]
    med = run_alternating(steppers, device, args.reps)
    load1 = os.getloadavg()[0]
    mem = {}
    for s in steppers:
        s.prepare()
        mem[s.name] = peak_extra_bytes(s.step, device)
    largest = max(torch.Size(s).numel() for s in shapes)
    base = med["adamw fused"]
    rows = []
    print(f"\n(a) T5-small shapes: {len(shapes)} tensors, {d / 1e6:.1f}M parameters, tau={tau}, float32 parameters; "
          f"{args.reps} alternating steps each, median; load {load0:.2f} -> {load1:.2f}")
    print(f"{'optimizer':28s} {'ms':>8s} {'/fused':>7s} {'reads/fused':>12s} {'GB/s':>6s} {'/floor':>7s} {'peak extra MB':>14s} "
          f"{'/(2*d_max*4B)':>14s}")
    for (name, _, _, (kind, n, sb)), s in zip(configs, steppers):
        t = med[name]
        nbytes = sum(traffic(kind, d, n, sb))
        pk = mem[name]
        reads = traffic(kind, d, n, sb)[0] / traffic("adamw", d)[0]
        row = dict(name=name, ms=t * 1e3, ratio_fused=t / base, reads_ratio=reads, gbs=nbytes / t / 1e9,
                   ratio_floor=t / (nbytes / bw),
                   peak_extra_mb=None if pk is None else pk / 1e6,
                   peak_ratio=None if pk is None else pk / (2 * largest * 4))
        rows.append(row)
        pk_s = "n/a" if pk is None else f"{pk / 1e6:.1f}"
        pr_s = "n/a" if pk is None else f"{row['peak_ratio']:.2f}"
        print(f"{name:28s} {t * 1e3:8.1f} {t / base:7.2f} {reads:12.2f} {row['gbs']:6.1f} {row['ratio_floor']:7.2f} "
              f"{pk_s:>14s} {pr_s:>14s}")
    return dict(shapes="t5-small", d=d, tau=tau, rows=rows, load=[load0, load1], largest=largest)


# -- (b) single tensors --------------------------------------------------------------------------


def fit_line(x, y):
    """``y = a + b x`` minimising the *relative* residuals (timing noise is relative); a, b, worst |residual| / y."""
    w = [1 / yi**2 for yi in y]
    sw, sx, sy = sum(w), sum(wi * xi for wi, xi in zip(w, x)), sum(wi * yi for wi, yi in zip(w, y))
    sxx = sum(wi * xi * xi for wi, xi in zip(w, x))
    sxy = sum(wi * xi * yi for wi, xi, yi in zip(w, x, y))
    b = (sw * sxy - sx * sy) / (sw * sxx - sx * sx)
    a = (sy - b * sx) / sw
    return a, b, max(abs(a + b * xi - yi) / yi for xi, yi in zip(x, y))


def bench_single(args, device, bw):
    ds = [int(float(v)) for v in args.sizes.split(",")]
    taus = [int(v) for v in args.taus.split(",")]
    print(f"\n(b) single tensors, Ginger refresh step (mc) vs fused AdamW, float32, median of alternating steps "
          f"({args.single_reps} at d=1e7, sqrt(1e7/d) times as many below: small steps are noisier)")
    print(f"{'d':>10s} {'tau':>4s} {'ginger ms':>10s} {'adamw ms':>9s} {'/fused':>7s} {'GB/s':>6s} {'/floor':>7s} {'peak/(2*d*4B)':>14s}")
    results = []
    for d in ds:
        grads = make_pool([(d,)], 3, device, 2)
        curvs = make_pool([(d,)], 2, device, 3)
        steppers = [Stepper("adamw", [(d,)], lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), grads, None, device)]
        for tau in taus:
            steppers.append(Stepper(f"tau{tau}", [(d,)], lambda ps, tau=tau: Ginger(ps, tau=tau, curvature="mc"), grads,
                                    curvs, device))
        med = run_alternating(steppers, device, max(args.single_reps, round(args.single_reps * (1e7 / d) ** 0.5)))
        for s in steppers[1:]:
            s.prepare()
            pk = peak_extra_bytes(s.step, device)
            tau = int(s.name[3:])
            t = med[s.name]
            nbytes = sum(traffic("refresh", d, tau))
            row = dict(d=d, tau=tau, ms=t * 1e3, adamw_ms=med["adamw"] * 1e3, ratio_fused=t / med["adamw"],
                       gbs=nbytes / t / 1e9, ratio_floor=t / (nbytes / bw),
                       peak_ratio=None if pk is None else pk / (2 * d * 4))
            results.append(row)
            pr = "n/a" if pk is None else f"{row['peak_ratio']:.2f}"
            print(f"{d:10d} {tau:4d} {t * 1e3:10.2f} {med['adamw'] * 1e3:9.2f} {row['ratio_fused']:7.2f} "
                  f"{row['gbs']:6.1f} {row['ratio_floor']:7.2f} {pr:>14s}", flush=True)
        del steppers, grads, curvs
    fits = {}
    print("\nfits (time in ms):")
    for tau in taus:
        pts = [(r["d"], r["ms"]) for r in results if r["tau"] == tau]
        if len(pts) > 1:
            a, b, res = fit_line([p[0] for p in pts], [p[1] for p in pts])
            fits[f"d|tau={tau}"] = dict(intercept_ms=a, ms_per_million=b * 1e6, max_rel_residual=res)
            print(f"  time vs d   at tau={tau:2d}: {a:8.3f} ms + {b * 1e6:8.3f} ms per 1e6 elements   "
                  f"(worst relative residual {res:.2f})")
    for d in ds:
        pts = [(r["tau"], r["ms"]) for r in results if r["d"] == d]
        if len(pts) > 1:
            a, b, res = fit_line([p[0] for p in pts], [p[1] for p in pts])
            fits[f"tau|d={d}"] = dict(intercept_ms=a, ms_per_tau=b, max_rel_residual=res)
            print(f"  time vs tau at d={d:9d}: {a:8.3f} ms + {b:8.3f} ms per unit of tau "
                  f"(worst relative residual {res:.2f}; per element per tau: {b * 1e6 / d:.2f} ns)")
    return dict(rows=results, fits=fits)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--tau", type=int, default=4)
    p.add_argument("--reps", type=int, default=9, help="alternating timed steps per config, T5-small shapes")
    p.add_argument("--single-reps", type=int, default=7)
    p.add_argument("--sizes", default="1e5,1e6,1e7")
    p.add_argument("--taus", default="1,4,8,16")
    p.add_argument("--skip-single", action="store_true")
    p.add_argument("--skip-t5", action="store_true")
    p.add_argument("--skip-foreach", action="store_true", help="foreach AdamW is slow on CPU (~1 s a step)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    kernel = fused.kernel_available() if device.type == "cpu" else False
    print(f"device: {name}; ginger_hf CPU kernel: {'yes' if kernel else 'no (torch passes)'}; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s (read + write); load average {os.getloadavg()}")
    out = dict(device=name, copy_gbs=bw / 1e9, kernel=kernel)
    if not args.skip_t5:
        out["t5"] = bench_t5(args, device, bw)
    if not args.skip_single:
        out["single"] = bench_single(args, device, bw)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
