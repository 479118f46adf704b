#!/usr/bin/env python
"""Prototype sweeps of Ginger step variants that are not (yet) optimizer arguments.

    python scripts/explore_variants.py --task finetune --variant graft_tensor --lrs 1e-3,3e-3,1e-2

The recommended Ginger is run on the proxy task (``scripts/sweep_lr.py``'s run, same model,
data, schedule, seed) with its fast step replaced by the plain reference step of
``ginger_hf.functional`` plus one change (``VARIANTS``): the step is composed from ``functional``'s
public stages and set on the Trainer's optimizer (``Ginger.tensor_step``). ``--variant none`` is the reference
itself: the product's math, with other rounding, which 300 steps of training amplify to a few
hundredths of eval loss. So a variant is compared with ``none`` run on the same path and seed,
never with the product's tables. Each run appends a JSON line to
``outputs/explore/TASK.jsonl`` (config ``variant:NAME``). ``--report FILE...`` prints the seed-0
grids and, for every variant run with other seeds, its paired difference to ``none`` per seed.
Why each variant exists, and what it showed: docs/research.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "recipes"))  # offline_tasks
from ginger_hf import functional as F  # noqa: E402
from ginger_hf import unwrap_ginger  # noqa: E402
from offline_tasks import proxy  # noqa: E402

_TINY = 1e-30


def _graft_block(u, m_hat, state, hp, k, g):
    """Per block, Ginger's direction with Adam-mini's step length ``|m_hat| / sqrt(e_hat / k)`` (no new state)."""
    e_per_coordinate, _ = F.damping_of(state, dataclasses.replace(hp, damping=0.0, relative_damping=1.0), k)
    length = torch.linalg.vector_norm(m_hat, dim=1, dtype=torch.float64) / e_per_coordinate.sqrt().clamp_min(_TINY)
    norm = torch.linalg.vector_norm(u, dim=1, dtype=torch.float64).clamp_min(_TINY)
    return u * (length / norm).to(u.dtype)[:, None]


def _adam_direction(m_hat, state, hp, g):
    """AdamW's step (before lr) from Ginger's momentum, with its own second moment ``v`` (``d`` more state)
    at Ginger's ``beta2``, eps 1e-8."""
    v = state.setdefault("graft_v", torch.zeros_like(m_hat))
    v.mul_(hp.beta2).addcmul_(g, g, value=1 - hp.beta2)
    return m_hat / ((v / (1 - hp.beta2 ** state["step"])).sqrt() + 1e-8)


def _graft_tensor(u, m_hat, state, hp, k, g):
    """Per tensor, Ginger's direction with AdamW's step length (Distributed Shampoo's Adam grafting)."""
    length = torch.linalg.vector_norm(_adam_direction(m_hat, state, hp, g), dtype=torch.float64)
    norm = torch.linalg.vector_norm(u, dtype=torch.float64).clamp_min(_TINY)
    return u * (length / norm).to(u.dtype)


def _graft_row(u, m_hat, state, hp, k, g):
    """Per block, Ginger's direction with AdamW's step length over the block: Shampoo grafts each
    preconditioner block, and per block it fuses into the whole-step kernel."""
    length = torch.linalg.vector_norm(_adam_direction(m_hat, state, hp, g), dim=1, dtype=torch.float64)
    norm = torch.linalg.vector_norm(u, dim=1, dtype=torch.float64).clamp_min(_TINY)
    return u * (length / norm).to(u.dtype)[:, None]


# Step-length variants: ``u`` (the direction, blocks as rows) -> the step to take.
GRAFTS = {"graft_block": _graft_block, "graft_tensor": _graft_tensor, "graft_row": _graft_row}
# ``memory_in_steps``: the curvature model's EMA rate counted per step, not per refresh. With refreshes every
# 4 steps (the recommended interval) each refresh decays the model by ``beta2^4``, so that its memory spans as
# many steps as ``e``'s (``1 / (1 - beta2)``).
# ``adam_coordinates``: Ginger on top of Adam. With ``D = sqrt(v_hat) + eps`` (Adam's denominator, ``v`` the EMA of
# ``g^2`` at ``beta2``: ``d`` more state), the low-rank model is of ``G~ = D^-1 G D^-1`` (built from ``c / D``, damped
# relative to ``|g / D|^2``) and the step is ``D^-1/2 f(G~) D^-1/2 m_hat``: exactly Adam's when ``G~`` is the identity,
# and a whitening of what Adam's diagonal leaves correlated otherwise.
VARIANTS = ("none", *GRAFTS, "memory_in_steps", "adam_coordinates")


def robust_eigh(K):
    """``torch.linalg.eigh``, retried on the matrices divided by their largest entry when LAPACK fails to converge
    (it can on the (n+1)-sized problems of a badly scaled block; same eigenvectors, eigenvalues scaled back)."""
    try:
        return torch.linalg.eigh(K)
    except torch.linalg.LinAlgError:
        scale = K.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(_TINY)
        lam, V = torch.linalg.eigh(K / scale)
        return lam * scale[..., 0], V


def reference_step(variant):
    """``fused.ginger``'s signature: ``functional.ginger``'s stages, composed with ``variant``'s change."""
    graft = GRAFTS.get(variant)

    def step(params, grads, curvatures, states, hypers, *, beta1, **_):
        for param, grad, c, state, hp in zip(params, grads, curvatures, states, hypers):
            if not F.all_finite(grad, c):
                raise FloatingPointError("prototype: non-finite gradient or curvature")
            U, m = F.explicit_basis(state)
            B, n, k = U.shape
            # the curvature model's rate (direction debiases s by 1 - its beta2^q)
            hp_s = dataclasses.replace(hp, beta2=hp.beta2**4) if variant == "memory_in_steps" else hp
            state["step"] += 1
            g = grad.reshape(B, k)
            c = None if c is None else c.reshape(B, k)
            m_hat = F.update_momentum(m, g, beta1, state["step"])
            root_d = None
            if variant == "adam_coordinates":
                v = state.setdefault("diag_v", torch.zeros_like(m))
                v.mul_(hp.beta2).addcmul_(g.to(m.dtype), g.to(m.dtype), value=1 - hp.beta2)
                d = (v / (1 - hp.beta2 ** state["step"])).sqrt() + 1e-8
                root_d = d.sqrt()
                g, c, m_hat = g / d, (None if c is None else c / d), m_hat / root_d
            if c is not None:
                F.refresh_curvature(state, U, c, hp_s.beta2, eigh=robust_eigh)
            F.update_energy(state, g, hp.beta2)
            u = F.direction(state, hp, U, m_hat, curvature_hyper=hp_s)
            if root_d is not None:
                u = u / root_d
            if graft is not None:
                u = graft(u, m_hat, state, hp, k, g.to(m.dtype))
            F.apply_step(param, u, hp)

    return step


class UseStep(TrainerCallback):
    """Makes the Trainer's Ginger take its steps with ``step`` (``Ginger.tensor_step``) from the first one."""

    def __init__(self, step):
        self.step = step

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        unwrap_ginger(optimizer).tensor_step = self.step


def report(paths: list[Path]) -> str:
    """Seed-0 grids (``sweep_lr.report``), and per task and variant run with other seeds, its paired difference
    to ``none`` on each seed that both ran (each at the learning rate it was run with there: its seed-0 best)."""
    from sweep_lr import grids, read_rows

    rows = read_rows(paths)
    out = [grids([r for r in rows if r["seed"] == 0])]
    reseeded = {(r["task"], r["config"], r["lr"]) for r in rows if r["seed"] != 0}
    lines = ["| task | variant (lr) - none (lr) | by seed | mean |", "|---|---|---|---|"]
    for task, config, lr in sorted(reseeded):
        if config == "variant:none":
            continue
        mine = {r["seed"]: r["eval_loss"] for r in rows if (r["task"], r["config"], r["lr"]) == (task, config, lr)}
        base = {r["seed"]: (r["eval_loss"], r["lr"]) for r in rows if r["task"] == task and r["config"] == "variant:none"
                and (task, "variant:none", r["lr"]) in reseeded}
        diffs = [(s, mine[s] - base[s][0]) for s in sorted(mine) if s in base]
        if not diffs:
            continue
        base_lr = base[diffs[0][0]][1]
        cells = ", ".join(f"{d:+.3f} (seed {s})" for s, d in diffs)
        lines.append(f"| {task} | {config} ({lr:g}) - none ({base_lr:g}) | {cells} | {sum(d for _, d in diffs) / len(diffs):+.3f} |")
    return "\n\n".join(out + ["\n".join(lines)])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=proxy.TASKS)
    p.add_argument("--variant", choices=VARIANTS)
    p.add_argument("--lrs", help="comma-separated learning rates")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=proxy.DEFAULT_MAX_STEPS)
    p.add_argument("--output", type=Path, default=None, help="default outputs/explore/TASK.jsonl")
    p.add_argument("--report", nargs="+", type=Path, default=None, metavar="FILE", help="print the tables and exit")
    args = p.parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    if not (args.task and args.variant and args.lrs):
        p.error("--task, --variant and --lrs are required to run")
    output = args.output or Path("outputs/explore") / f"{args.task}.jsonl"
    output.parent.mkdir(parents=True, exist_ok=True)
    config = f"variant:{args.variant}"
    from sweep_lr import read_rows, task_data

    done = {(r["config"], r["lr"], r["seed"]) for r in read_rows([output])} if output.exists() else set()
    tokenizer = proxy.load_tokenizer()
    data = task_data(tokenizer, args.max_steps)
    for lr in (float(x) for x in args.lrs.split(",")):
        if (config, lr, args.seed) in done:
            continue
        start = time.perf_counter()
        try:
            r = proxy.run("ginger", lr, task=args.task, max_steps=args.max_steps, output_dir=Path("outputs/sweep_runs"),
                          data=data, tokenizer=tokenizer, rouge_size=0, seed=args.seed, disable_tqdm=True,
                          callbacks=[UseStep(reference_step(args.variant))])
            loss, curve = r["eval_loss"], r["eval_curve"]
        except FloatingPointError:
            loss, curve = float("nan"), []
        row = {"task": args.task, "config": config, "lr": lr, "seed": args.seed, "max_steps": args.max_steps,
               "eval_loss": loss, "eval_curve": curve, "wall_seconds": time.perf_counter() - start}
        with output.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{args.task} {config} lr {lr:g}: eval loss {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
