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
