"""scripts/explore_variants.py: its prototype step is the reference step, and each variant changes what it says."""

import pytest
import torch
from helpers import load_script

from ginger_hf import functional as F

SHAPES = [(6, 9), (7,), (3, 2, 2)]


def _run(step, steps=7, interval=3):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    states = [F.init_state(p, 2, "row", torch.float64) for p in params]
    hp = F.Hyper(lr=0.01, beta2=0.9, damping=1e-12, relative_damping=0.1, power=0.5, bias_correction=True,
                 blocks="row")
    history = []
    for t in range(steps):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        curvs = [torch.randn(s, generator=gen, dtype=torch.float64) if t % interval == 0 else None for s in SHAPES]
        before = [p.clone() for p in params]
        step(params, grads, curvs, states, [hp] * len(params), beta1=0.8)
        history.append((before, [p.clone() for p in params], grads))
    return params, states, history


def test_variant_none_is_the_reference_step_bit_for_bit():
    explore = load_script("explore_variants")
    ours, our_states, _ = _run(explore.reference_step("none"))
    ref, ref_states, _ = _run(F.ginger)
    for p, q, s, r in zip(ours, ref, our_states, ref_states):
        assert torch.equal(p, q)
        assert torch.equal(s["U"], r["U"]) and torch.equal(s["s"], r["s"]) and torch.equal(s["e"], r["e"])


@pytest.mark.parametrize("variant", ["graft_tensor", "graft_row"])
def test_adam_grafting_steps_by_adams_length_in_gingers_direction(variant):
    """Per tensor (``graft_tensor``) or per row (``graft_row``): the step's length is AdamW's, computed here."""
    explore = load_script("explore_variants")
    _, _, grafted = _run(explore.reference_step(variant))
    _, _, plain = _run(explore.reference_step("none"))
    beta1, beta2, lr = 0.8, 0.9, 0.01
    m = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    v = [torch.zeros(s, dtype=torch.float64) for s in SHAPES]
    for t, ((before, after, grads), (p_before, p_after, _)) in enumerate(zip(grafted, plain), start=1):
        for i, g in enumerate(grads):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            adam = (m[i] / (1 - beta1**t)) / ((v[i] / (1 - beta2**t)).sqrt() + 1e-8)
            step, direction = (before[i] - after[i]) / lr, (p_before[i] - p_after[i]) / lr
            rows = (-1,) if variant == "graft_tensor" else (F.block_shape(step.shape, "row")[0], -1)
            step, direction, adam = step.reshape(rows), direction.reshape(rows), adam.reshape(rows)
            length = adam.norm(dim=-1, keepdim=True)
            if t == 1:  # same start: the grafted step is the plain one rescaled to Adam's length
                torch.testing.assert_close(step, direction * length / direction.norm(dim=-1, keepdim=True),
                                           rtol=1e-12, atol=0)
            torch.testing.assert_close(step.norm(dim=-1, keepdim=True), length, rtol=1e-12, atol=0)


def test_adam_coordinates_is_ginger_on_adams_diagonal():
    """``adam_coordinates`` against a dense float64 computation: per block, ``D^-1/2 G~^-1/2 D^-1/2 m_hat`` with
    ``D = sqrt(v_hat) + eps`` and ``G~`` the damped top-2 EMA of ``(c / D)(c / D)^T``."""
    explore = load_script("explore_variants")
    params, _, history = _run(explore.reference_step("adam_coordinates"))
    beta1, beta2, lr, lam, tau, interval = 0.8, 0.9, 0.01, 0.1, 2, 3
    gen = torch.Generator().manual_seed(0)
    theta = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    splits = [F.block_shape(s, "row") for s in SHAPES]
    m = [torch.zeros(B, k, dtype=torch.float64) for B, k in splits]
    v = [torch.zeros(B, k, dtype=torch.float64) for B, k in splits]
    e = [torch.zeros(B, dtype=torch.float64) for B, _ in splits]
    L = [torch.zeros(B, k, k, dtype=torch.float64) for B, k in splits]
    q = 0
    for t in range(1, len(history) + 1):
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        curvs = [torch.randn(s, generator=gen, dtype=torch.float64) if (t - 1) % interval == 0 else None for s in SHAPES]
        torch.testing.assert_close(grads, history[t - 1][2], rtol=0, atol=0)  # the same draws as the run
        q += curvs[0] is not None
        for i, ((B, k), g, c) in enumerate(zip(splits, grads, curvs)):
            g = g.reshape(B, k)
            v[i] = beta2 * v[i] + (1 - beta2) * g * g
            d = (v[i] / (1 - beta2**t)).sqrt() + 1e-8
            m[i] = beta1 * m[i] + (1 - beta1) * g
            if c is not None:
                cn = c.reshape(B, k) / d
                full = beta2 * L[i] + (1 - beta2) * cn[:, :, None] * cn[:, None, :]
                lam_, V = torch.linalg.eigh(full)
                L[i] = (V[..., -tau:] * lam_[:, None, -tau:]) @ V[..., -tau:].transpose(1, 2)
            e[i] = beta2 * e[i] + (1 - beta2) * (g / d).square().sum(1)
            gamma = 1e-12 + lam * e[i] / ((1 - beta2**t) * k)
            G = gamma[:, None, None] * torch.eye(k, dtype=torch.float64) + L[i] / (1 - beta2**q)
            w, V = torch.linalg.eigh(G)
            x = (m[i] / (1 - beta1**t)) / d.sqrt()
            u = (V @ (w.pow(-0.5) * (V.transpose(1, 2) @ x[:, :, None])[..., 0])[:, :, None])[..., 0] / d.sqrt()
            theta[i] = theta[i] - lr * u.reshape(theta[i].shape)
    for p, ref in zip(params, theta):
        torch.testing.assert_close(p, ref, rtol=1e-10, atol=1e-12)


def test_a_variant_reaches_the_optimizer_through_its_public_step():
    """``UseStep`` sets ``Ginger.tensor_step`` on the optimizer inside the Trainer's wrapper; the reference step
    set there trains as the fast step does (to rounding), and nothing of ginger_hf or torch is patched."""
    from pathlib import Path

    from ginger_hf import Ginger, fused

    explore = load_script("explore_variants")
    torch.manual_seed(0)
    start = [torch.randn(6, 9), torch.randn(7)]
    runs = []
    for use in (False, True):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = Ginger(params, lr=0.01, curvature="empirical")
        assert opt.tensor_step is fused.ginger
        if use:
            wrapper = type("Wrapped", (), {"optimizer": opt})()
            explore.UseStep(explore.reference_step("none")).on_train_begin(None, None, None, optimizer=wrapper)
            assert opt.tensor_step is not fused.ginger
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        runs.append(params)
    for a, b in zip(*runs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    source = Path(explore.__file__).read_text()
    assert "F._" not in source and "fused.ginger =" not in source and "torch.linalg.eigh =" not in source


def test_robust_eigh_is_eigh_where_lapack_converges():
    explore = load_script("explore_variants")
    K = torch.tensor([[[2.0, 1.0], [1.0, 3.0]]], dtype=torch.float64) * 1e3
    lam, V = explore.robust_eigh(K)
    ref_lam, ref_V = torch.linalg.eigh(K)
    assert torch.equal(lam, ref_lam) and torch.equal(V, ref_V)
