"""scripts/explore_variants.py: its prototype step is the reference step, and each variant changes what it says."""

import torch
from helpers import load_script

from ginger_hf import functional as F

SHAPES = [(6, 9), (7,), (3, 2, 2)]


def _run(step, steps=7, interval=3, seed=0, **hyper):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    states = [F.init_state(p, 2, "row", torch.float64) for p in params]
    hp = F.Hyper(lr=0.01, beta2=0.9, damping=1e-12, relative_damping=0.1, power=0.5, bias_correction=True,
                 blocks="row", **hyper)
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


def test_graft_tensor_steps_each_tensor_by_adams_length_in_gingers_direction():
    explore = load_script("explore_variants")
    _, _, grafted = _run(explore.reference_step("graft_tensor"))
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
            if t == 1:  # same start: the grafted step is the plain one rescaled to Adam's length
                torch.testing.assert_close(step, direction * adam.norm() / direction.norm(), rtol=1e-12, atol=0)
            torch.testing.assert_close(step.norm(), adam.norm(), rtol=1e-12, atol=0)
