"""Numerical robustness: long float32 runs, extreme curvature scales, non-finite inputs."""

import math

import pytest
import torch
from helpers import orthonormality_error

from ginger_hf import Ginger

DAMPINGS = [1e-8, 1e-5, 1e-2, 1.0]


def test_ten_thousand_float32_steps_stay_finite_and_orthonormal():
    gen = torch.Generator().manual_seed(0)
    groups = [
        dict(params=[torch.nn.Parameter(torch.randn(48, generator=gen))], damping=damping) for damping in DAMPINGS
    ]
    groups[0]["params"].append(torch.nn.Parameter(torch.randn(3, generator=gen)))  # d < tau
    params = [p for g in groups for p in g["params"]]
    opt = Ginger(groups, lr=1e-4, tau=4, rho=1.0, curvature="mc", preset="paper")
    worst = 0.0
    for step in range(10_000):
        norm = 10.0 ** (-6 + 12 * torch.rand((), generator=gen).item())
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
            c = torch.randn(p.shape, generator=gen)
            if step % 3 == 1 and p in opt.state:
                # Almost in the span of the current basis: the cancelling case.
                st = opt.state[p]
                U = st["R"][0].float() @ st["U"].reshape(st["U"].shape[0], -1)
                c = (U.T @ torch.randn(U.shape[0], generator=gen)).view(p.shape) + 1e-7 * c
            p.curvature = c * (norm / c.norm())
        opt.step()
        if step % 10 == 0 or step > 9_990:
            for p in params:
                state = opt.state[p]
                for key in ("m", "U", "s", "R", "e"):
                    assert torch.isfinite(state[key]).all(), (step, key)
                assert (state["s"] >= 0).all()
                worst = max(worst, orthonormality_error(state))
                assert worst <= 1e-4, (step, worst)
            assert all(torch.isfinite(p).all() for p in params)
    assert all(opt.state[p]["skipped"] == 0 for p in params)
    print(f"worst orthonormality error {worst:.2e}")


def test_largest_eigenvalue_follows_the_curvature_scale():
    """A fixed direction of curvature norm 1e6 is captured with eigenvalue ~ ||c||^2."""
    p = torch.nn.Parameter(torch.zeros(20))
    opt = Ginger([p], betas=(0.9, 0.5), tau=2, curvature="mc", curvature_interval=1)
    direction = torch.randn(20)
    direction /= direction.norm()
    for _ in range(30):
        p.grad = torch.ones(20)
        p.curvature = 1e6 * direction
        opt.step()
    st = opt.state[p]
    s, E = st["s"][0], st["R"][0] @ st["U"].double().reshape(2, 20)
    assert math.isclose(s.max().item(), 1e12, rel_tol=1e-5)
    assert abs(abs(E[s.argmax()] @ direction.double()) - 1) < 1e-5


def _snapshot(opt, params):
    return [p.detach().clone() for p in params], [
        {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()} for p in params
    ]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_skips_only_that_tensor(bad):
    torch.manual_seed(0)
    good, poisoned = torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))
    opt = Ginger([good, poisoned], lr=0.1, tau=2, curvature="mc")
    for _ in range(3):
        for p in (good, poisoned):
            p.grad, p.curvature = torch.randn(p.shape), torch.randn(p.shape)
        opt.step()
    (before_params, before_state) = _snapshot(opt, [good, poisoned])

    for p in (good, poisoned):
        p.grad, p.curvature = torch.randn(p.shape), torch.randn(p.shape)
    poisoned.grad[1, 2] = bad
    opt.step()

    assert torch.equal(poisoned.detach(), before_params[1])
    after = opt.state[poisoned]
    for key, value in before_state[1].items():
        if key in ("skipped", "clock"):  # the schedule's clock counts step() calls, skipped ones too
            assert after[key] == value + 1
        elif isinstance(value, torch.Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key
    assert not torch.equal(good.detach(), before_params[0])
    assert opt.state[good]["step"] == 4 and opt.state[good]["skipped"] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_non_finite_number_anywhere_in_a_tensor_is_found(dtype):
    """The kernel checks every row of a tensor before it writes any: a NaN in the first or last row, at either
    end of a row or between the two threads' shares leaves the tensor untouched; a tensor beside it steps."""
    shape, size = (37, 53), 37 * 53
    for where in (0, size // 8, size // 4 - 1, size // 4, size // 2, size - 2, size - 1):
        torch.manual_seed(0)
        poisoned, good = torch.nn.Parameter(torch.randn(shape).to(dtype)), torch.nn.Parameter(torch.randn(9).to(dtype))
        opt = Ginger([poisoned, good], lr=0.1, tau=2, curvature="mc")  # row blocks: the kernel's whole step
        for step in range(3):
            for p in (poisoned, good):
                p.grad, p.curvature = torch.randn(p.shape).to(dtype), torch.randn(p.shape).to(dtype)
            if step == 2:
                before, other = poisoned.detach().clone(), good.detach().clone()
                poisoned.grad.view(-1)[where] = float("nan")
            opt.step()
        assert torch.equal(poisoned.detach(), before), where
        assert not torch.equal(good.detach(), other), where
        assert opt.state[poisoned]["skipped"] == 1, where


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("preset", ["recommended", "paper"])
def test_non_finite_curvature_with_a_finite_gradient_still_steps(bad, preset):
    """fp16 overflow in the sampled-label loss, say: the refresh is skipped (and counted), the step is not."""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = Ginger([p], lr=0.1, tau=2, curvature="mc", preset=preset, curvature_interval=1)
    for _ in range(3):
        p.grad, p.curvature = torch.randn(p.shape), torch.randn(p.shape)
        opt.step()
    (before_params, before_state) = _snapshot(opt, [p])
    p.grad, p.curvature = torch.randn(p.shape), torch.randn(p.shape)
    p.curvature[1, 2] = bad
    opt.step()
    state = opt.state[p]
    assert not torch.equal(p.detach(), before_params[0]) and torch.isfinite(p).all()
    assert state["step"] == 4 and state["curvature_skipped"] == 1 and state["curvature_steps"] == 3
    assert state["skipped"] == 0
    for key in ("U", "s", "R"):  # the curvature model is kept as it was (e, the gradient's energy, moves on)
        assert torch.equal(state[key], before_state[0][key]), key
    assert not torch.equal(state["m"], before_state[0]["m"]) and torch.isfinite(state["m"]).all()


def test_non_finite_gradient_in_empirical_mode_is_skipped_too():
    p = torch.nn.Parameter(torch.randn(4))
    opt = Ginger([p], curvature="empirical")
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 0.0])
    before = p.detach().clone()
    opt.step()
    assert torch.equal(p.detach(), before)
    assert opt.state[p]["skipped"] == 1 and opt.state[p]["step"] == 0
    assert torch.equal(opt.state[p]["m"], torch.zeros(4))
