"""``Ginger`` and the reference ``functional.ginger`` against the dense float64 oracle (GINGER.md, "Exactness check").

Each lever is switched on its own and together with the others, in float64 and float32:
row blocks, the root (power 0.5), relative damping, bias correction, the rho clip and
weight decay, the curvature interval, and the paper's configuration.
"""

import pytest
import torch
from dense_reference import DenseGinger
from helpers import relative_error

from ginger_hf import Ginger
from ginger_hf import functional as F

SHAPES = [(), (1,), (7,), (5, 4), (2, 3, 2, 2), (40,), (6, 9)]
TOLERANCE = {torch.float64: 1e-11, torch.float32: 2e-6}
BASE = dict(lr=0.05, betas=(0.9, 0.99), damping=0.1, rho=None, weight_decay=0.0, blocks="tensor", power=1.0,
            relative_damping=0.0, bias_correction=False)
LEVERS = {
    "paper": dict(rho=1.0),  # with the released damping 1e-5: test_paper_damping_float64
    "rows": dict(blocks="row"),
    "root": dict(power=0.5),
    "relative damping": dict(relative_damping=0.3, damping=1e-8),
    "bias correction": dict(bias_correction=True),
    "rho and weight decay": dict(rho=0.5, weight_decay=0.1, lr=0.02, betas=(0.8, 0.9)),
    "recommended": dict(blocks="row", power=0.5, relative_damping=0.1, damping=1e-12, bias_correction=True),
}


def run_pair(dtype, mode, hp, steps, interval=1, seed=0, backend=None):
    """Train the same parameters with Ginger and with DenseGinger; return both."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]
    opt = Ginger(params, curvature=mode, curvature_interval=interval, backend=backend, **hp)
    dense = DenseGinger(SHAPES, curvature_interval=interval, **hp)
    thetas = [p.detach().double().reshape(-1).clone() for p in params]
    for _ in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        curvs = [2 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, g, c in zip(params, grads, curvs):
            p.grad = g.to(dtype)
            if mode == "mc" and opt.needs_curvature():
                p.curvature = c.to(dtype)
        thetas = dense.step(thetas, grads, grads if mode == "empirical" else curvs)
        opt.step()
    return params, thetas, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("lever", LEVERS)
@pytest.mark.parametrize("mode", ["mc", "empirical"])
def test_optimizer_matches_dense_reference(dtype, tau, lever, mode):
    params, thetas, opt = run_pair(dtype, mode, dict(BASE, tau=tau, **LEVERS[lever]), steps=3 * tau + 4)
    for p, theta in zip(params, thetas):
        assert p.dtype == dtype
        assert relative_error(p.detach(), theta) <= TOLERANCE[dtype], (p.shape, relative_error(p.detach(), theta))


@pytest.mark.parametrize("tau", [1, 4])
def test_paper_damping_float64(tau):
    """The released damping (1e-5) is exact in float64. (In float32, G^-1 = m / gamma - ... cancels
    like eps * s / gamma, so its float32 results are checked with a damping of 0.1 above.)"""
    hp = dict(BASE, tau=tau, damping=1e-5, rho=1.0, lr=1e-3)
    params, thetas, _ = run_pair(torch.float64, "mc", hp, steps=3 * tau + 4)
    for p, theta in zip(params, thetas):
        assert relative_error(p.detach(), theta) <= 1e-9


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("lever", ["paper", "recommended"])
def test_every_backend_matches_dense_reference(backend, lever):
    params, thetas, _ = run_pair(torch.float32, "mc", dict(BASE, tau=4, **LEVERS[lever]), steps=16, backend=backend)
    for p, theta in zip(params, thetas):
        assert relative_error(p.detach(), theta) <= TOLERANCE[torch.float32]


@pytest.mark.parametrize("lever", LEVERS)
def test_reference_step_matches_dense_reference(lever):
    """``functional.ginger`` itself, the fast step's oracle, against the dense oracle, in float64."""
    hp = dict(BASE, tau=3, **LEVERS[lever])
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    states = [F.init_state(p, 3, hp["blocks"], torch.float64) for p in params]
    hyper = F.Hyper(lr=hp["lr"], beta2=hp["betas"][1], damping=hp["damping"], relative_damping=hp["relative_damping"],
                    power=hp["power"], rho=hp["rho"], weight_decay=hp["weight_decay"],
                    bias_correction=hp["bias_correction"], blocks=hp["blocks"])
    dense = DenseGinger(SHAPES, **hp)
    thetas = [p.reshape(-1).clone() for p in params]
    for _ in range(13):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        curvs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        thetas = dense.step(thetas, grads, curvs)
        F.ginger(params, grads, curvs, states, [hyper] * len(params), beta1=hp["betas"][0])
    for p, theta in zip(params, thetas):
        assert relative_error(p, theta) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_two_param_groups_with_their_own_hyperparameters(dtype):
    """Groups that differ in every lever (and in beta1) step as the dense oracle of each says."""
    hps = [dict(BASE, tau=2, **LEVERS["recommended"]), dict(BASE, tau=3, **LEVERS["rho and weight decay"])]
    gen = torch.Generator().manual_seed(1)
    groups = [dict(params=[torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype))
                           for s in SHAPES], **hp) for hp in hps]
    opt = Ginger(groups, curvature="mc", curvature_interval=1)
    denses = [DenseGinger(SHAPES, **hp) for hp in hps]
    thetas = [[p.detach().double().reshape(-1).clone() for p in g["params"]] for g in groups]
    for _ in range(13):
        for i, g in enumerate(groups):
            grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in g["params"]]
            curvs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in g["params"]]
            for p, gr, c in zip(g["params"], grads, curvs):
                p.grad, p.curvature = gr.to(dtype), c.to(dtype)
            thetas[i] = denses[i].step(thetas[i], grads, curvs)
        opt.step()
    for g, ref in zip(groups, thetas):
        for p, theta in zip(g["params"], ref):
            assert relative_error(p.detach(), theta) <= TOLERANCE[dtype]


@pytest.mark.parametrize("interval", [2, 3])
@pytest.mark.parametrize("lever", ["paper", "recommended"])
def test_curvature_interval_refreshes_on_steps_1_plus_multiples(interval, lever):
    params, thetas, _ = run_pair(torch.float64, "mc", dict(BASE, tau=2, **LEVERS[lever]), steps=11,
                                 interval=interval, seed=2)
    for p, theta in zip(params, thetas):
        assert relative_error(p.detach(), theta) <= TOLERANCE[torch.float64]


def test_curvature_interval_needs_no_curvature_between_refreshes():
    p = torch.nn.Parameter(torch.randn(6, dtype=torch.float64))
    opt = Ginger([p], curvature="mc", curvature_interval=3)
    for step in range(1, 8):
        assert opt.needs_curvature() == ((step - 1) % 3 == 0)
        p.grad = torch.randn(6, dtype=torch.float64)
        if opt.needs_curvature():
            p.curvature = torch.randn(6, dtype=torch.float64)
        opt.step()
        assert p.curvature is None  # consumed


def test_mc_refresh_without_curvature_explains_how_to_supply_one():
    p = torch.nn.Parameter(torch.randn(3))
    opt = Ginger([p])
    p.grad = torch.ones(3)
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match="add_sampled_label_curvature.*curvature='empirical'"):
        opt.step()
    assert torch.equal(p.detach(), before) and not opt.state


def test_rows_on_different_paths_side_by_side_match_dense_reference():
    """The CPU kernel steps eight rows at a time, their eigenproblems' roots side by side (a row per SIMD lane).
    Rows whose curvature vectors are zero (every pole deflated), repeated from the last refresh (a residual
    near zero) or fresh, in the same eight, each match the dense oracle."""
    shapes = [(16, 12), (8,), (24, 5)]
    hp = dict(BASE, tau=4, **LEVERS["recommended"])
    gen = torch.Generator().manual_seed(7)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = Ginger(params, curvature="mc", curvature_interval=1, **hp)
    dense = DenseGinger(shapes, curvature_interval=1, **hp)
    thetas = [p.detach().double().reshape(-1).clone() for p in params]
    last = None
    for step in range(14):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        curvs = [2 * torch.randn(s, generator=gen) for s in shapes]
        for i, c in enumerate(curvs):
            if c.dim() == 2:
                c[3::4] = 0
                if step >= 5 and step % 3 == 0:
                    c[:6] = last[i][:6]
        last = [c.clone() for c in curvs]
        for p, g, c in zip(params, grads, curvs):
            p.grad, p.curvature = g, c
        thetas = dense.step(thetas, [g.double() for g in grads], [c.double() for c in curvs])
        opt.step()
    for p, theta in zip(params, thetas):
        assert relative_error(p.detach(), theta) <= TOLERANCE[torch.float32], p.shape
