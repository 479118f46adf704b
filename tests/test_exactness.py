"""Ginger against the dense float64 reference of GINGER.md ("Exactness check")."""

import pytest
import torch

from ginger_hf import Ginger
from dense_reference import DenseGinger

SHAPES = [(), (1,), (7,), (5, 4), (2, 3, 2, 2), (40,)]
TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-3}


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def run_pair(dtype, curvature_source, groups_hp, steps, interval=1, seed=0):
    """Train the same parameters with Ginger and with one DenseGinger per group; return both."""
    gen = torch.Generator().manual_seed(seed)
    groups = []
    for hp in groups_hp:
        params = [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64).to(dtype)) for s in SHAPES]
        groups.append(dict(params=params, **hp))
    mode = "empirical" if curvature_source == "gradient" else "mc"
    opt = Ginger(groups, curvature=mode, curvature_interval=interval)
    refs = [DenseGinger([p.shape for p in g["params"]], curvature_interval=interval, **hp) for g, hp in zip(groups, groups_hp)]
    thetas = [[p.detach().double().clone() for p in g["params"]] for g in groups]

    for _ in range(steps):
        for g, ref, i in zip(groups, refs, range(len(groups))):
            grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in g["params"]]
            curvs = [2 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in g["params"]]
            for p, gr, c in zip(g["params"], grads, curvs):
                p.grad = gr.to(dtype)
                if mode == "mc":
                    p.curvature = c.to(dtype)
            thetas[i] = ref.step(thetas[i], grads, grads if mode == "empirical" else curvs)
        opt.step()
    return groups, thetas, opt


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tau", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("curvature_source", ["gradient", "explicit"])
@pytest.mark.parametrize(
    "hp",
    [
        dict(lr=0.05, betas=(0.9, 0.99), damping=0.1, rho=None, weight_decay=0.0),
        dict(lr=0.02, betas=(0.8, 0.9), damping=0.05, rho=0.5, weight_decay=0.1),
    ],
    ids=["plain", "rho+wd"],
)
def test_matches_dense_reference(dtype, tau, curvature_source, hp):
    groups, thetas, _ = run_pair(dtype, curvature_source, [dict(hp, tau=tau)], steps=3 * tau + 4)
    for p, ref in zip(groups[0]["params"], thetas[0]):
        assert p.dtype == dtype
        assert relative_error(p.detach(), ref.view(p.shape)) <= TOLERANCE[dtype], p.shape


@pytest.mark.parametrize("tau", [1, 4])
def test_small_damping_float64(tau):
    """The released default damping (1e-5) is exact in float64 too."""
    hp = dict(lr=1e-3, betas=(0.9, 0.99), tau=tau, damping=1e-5, rho=1.0, weight_decay=0.0)
    groups, thetas, _ = run_pair(torch.float64, "explicit", [hp], steps=3 * tau + 4)
    for p, ref in zip(groups[0]["params"], thetas[0]):
        assert relative_error(p.detach(), ref.view(p.shape)) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("curvature_source", ["gradient", "explicit"])
@pytest.mark.parametrize("beta1_second", [0.7, 0.9])  # 0.9: both groups share one fused call
def test_two_param_groups_with_their_own_hyperparameters(dtype, curvature_source, beta1_second):
    hps = [
        dict(lr=0.05, betas=(0.9, 0.99), tau=2, damping=0.1, rho=None, weight_decay=0.0),
        dict(lr=0.01, betas=(beta1_second, 0.9), tau=3, damping=0.3, rho=0.2, weight_decay=0.05),
    ]
    groups, thetas, opt = run_pair(dtype, curvature_source, hps, steps=13, seed=1)
    for g, ref_thetas, hp in zip(groups, thetas, hps):
        for p, ref in zip(g["params"], ref_thetas):
            assert relative_error(p.detach(), ref.view(p.shape)) <= TOLERANCE[dtype]
            assert opt.state[p]["U"].shape[0] == min(hp["tau"], p.numel())


@pytest.mark.parametrize("interval", [2, 3])
def test_curvature_interval_refreshes_on_steps_1_plus_multiples(interval):
    hp = dict(lr=0.05, betas=(0.9, 0.9), tau=2, damping=0.1, rho=None, weight_decay=0.0)
    groups, thetas, _ = run_pair(torch.float64, "explicit", [hp], steps=11, interval=interval, seed=2)
    for p, ref in zip(groups[0]["params"], thetas[0]):
        assert relative_error(p.detach(), ref.view(p.shape)) <= 1e-6


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
