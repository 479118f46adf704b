"""The Optimizer shell: argument checks, checkpoints, state size, dtypes, devices."""

import copy

import pytest
import torch

from ginger_hf import PRESETS, Ginger, state_bytes
from ginger_hf.state_schema import COUNTERS

BAD_ARGUMENTS = [
    (dict(tau=0), ValueError, "tau must be an integer >= 1"),
    (dict(tau=2.0), TypeError, "tau must be an integer >= 1"),
    (dict(tau=True), TypeError, "tau must be an integer >= 1"),
    (dict(damping=0.0), ValueError, "damping must be a finite float > 0"),
    (dict(damping=-1e-3), ValueError, "damping must be a finite float > 0"),
    (dict(betas=(1.0, 0.99)), ValueError, r"beta1 must be in \[0, 1\)"),
    (dict(betas=(0.9, -0.1)), ValueError, r"beta2 must be in \[0, 1\)"),
    (dict(betas=(0.9,)), ValueError, "betas must be a pair"),
    (dict(rho=0.0), ValueError, "rho must be a float > 0, or None"),
    (dict(lr=-1e-3), ValueError, "lr must be a finite float >= 0"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay must be a finite float >= 0"),
    (dict(curvature="fisher"), ValueError, r"curvature must be one of \('mc', 'empirical'\)"),
    (dict(curvature_interval=0), ValueError, "curvature_interval must be an integer >= 1"),
    (dict(state_dtype=torch.int32), TypeError, "state_dtype must be None or a floating"),
    (dict(blocks="column"), ValueError, r"blocks must be one of \('tensor', 'row'\)"),
    (dict(power=0.0), ValueError, r"power must be in \(0, 1\]"),
    (dict(power=2), ValueError, r"power must be in \(0, 1\]"),
    (dict(relative_damping=-0.1), ValueError, "relative_damping must be a finite float >= 0"),
    (dict(bias_correction="yes"), TypeError, "bias_correction must be True or False"),
]
CONSTRUCTOR_ONLY = [
    (dict(preset="adam"), ValueError, r"preset must be one of \('recommended', 'paper'\)"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(curvature_scale="sum"), ValueError, r"curvature_scale must be one of \('mean', 'sqrt'\)"),
]


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS + CONSTRUCTOR_ONLY)
def test_bad_arguments_are_refused_with_the_allowed_values(kwargs, error, message):
    p = torch.nn.Parameter(torch.randn(3))
    with pytest.raises(error, match=message):
        Ginger([p], **kwargs)


@pytest.mark.parametrize("kwargs,error,message", BAD_ARGUMENTS)
def test_bad_param_group_leaves_the_optimizer_untouched(kwargs, error, message):
    p, q = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    opt = Ginger([p])
    groups_before = copy.deepcopy(opt.param_groups)
    with pytest.raises(error, match=message):
        opt.add_param_group(dict(params=[q], **kwargs))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["params"][0] is p
    assert opt.param_groups[0].keys() == groups_before[0].keys()


def test_complex_parameters_are_refused():
    with pytest.raises(TypeError, match="real floating point"):
        Ginger([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


def test_sparse_gradient_is_refused_before_any_change():
    emb = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.randn(3))
    opt = Ginger([dense, emb.weight], curvature="empirical")
    emb(torch.tensor([1, 2])).sum().backward()
    dense.grad = torch.ones(3)
    before = (dense.detach().clone(), emb.weight.detach().clone())
    with pytest.raises(TypeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense.detach(), before[0]) and torch.equal(emb.weight.detach(), before[1])
    assert not opt.state


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def _train(model, opt, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(0, 3, (16,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if opt.needs_curvature():
            # An explicit curvature vector that differs from the gradient, deterministic in the data.
            curv_loss = torch.nn.functional.cross_entropy(model(x), (y + 1) % 3)
            grads = torch.autograd.grad(curv_loss, list(model.parameters()))
            for p, g in zip(model.parameters(), grads):
                p.curvature = 4 * g
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("curvature", ["mc", "empirical"])
def test_state_dict_round_trip_is_bit_identical(curvature, tmp_path):
    kwargs = dict(lr=1e-2, tau=3, damping=1e-3, weight_decay=0.01, curvature=curvature, curvature_interval=2)
    straight = _model()
    opt = Ginger(straight.parameters(), **kwargs)
    _train(straight, opt, 10, seed=1)
    _train(straight, opt, 10, seed=2)

    first = _model()
    opt1 = Ginger(first.parameters(), **kwargs)
    _train(first, opt1, 10, seed=1)
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict()}, tmp_path / "ckpt.pt")

    resumed = _model()
    torch.manual_seed(123)  # a different init: everything must come from the checkpoint
    for p in resumed.parameters():
        p.data.normal_()
    opt2 = Ginger(resumed.parameters(), **kwargs)
    ckpt = torch.load(tmp_path / "ckpt.pt")
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    _train(resumed, opt2, 10, seed=2)

    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        for key in ("m", "U", "s", "R", "e"):
            assert torch.equal(opt.state[a][key], opt2.state[b][key])


def test_load_state_dict_keeps_float32_state_of_bf16_parameters():
    p = torch.nn.Parameter(torch.randn(8, dtype=torch.bfloat16))
    opt = Ginger([p], curvature="empirical")
    p.grad = torch.randn(8, dtype=torch.bfloat16)
    opt.step()
    assert opt.state[p]["m"].dtype == torch.float32 and opt.state[p]["U"].dtype == torch.float32
    q = torch.nn.Parameter(p.detach().clone())
    opt2 = Ginger([q], curvature="empirical")
    opt2.load_state_dict(opt.state_dict())
    for key in ("m", "U", "s", "R", "e"):
        assert opt2.state[q][key].dtype == opt.state[p][key].dtype
        assert torch.equal(opt2.state[q][key], opt.state[p][key])
    assert opt2.state[q]["s"].dtype == torch.float64


@pytest.mark.parametrize("state_dtype", [None, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("tau", [1, 4])
@pytest.mark.parametrize("blocks", ["tensor", "row"])
def test_state_bytes_match_the_documented_formula(state_dtype, tau, blocks):
    """(n + 1) d numbers of the state dtype (m, U), and float64 s, R, e per block: n + n^2 + 1."""
    torch.manual_seed(0)
    shapes = [(), (3,), (7, 5), (2, 3, 4)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = Ginger(params, tau=tau, state_dtype=state_dtype, curvature="empirical", blocks=blocks)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    itemsize = (state_dtype or torch.float32).itemsize
    expected = 0
    for p in params:
        B = p.shape[0] if blocks == "row" and p.dim() >= 2 else 1
        n = min(tau, p.numel() // B)
        expected += (n + 1) * p.numel() * itemsize + 8 * B * (n + n * n + 1)
    # the device path (float64 here: not the C++ kernel's) keeps its four counters as int64 device tensors
    counters = sum(8 for st in opt.state.values() for key in COUNTERS if torch.is_tensor(st[key]))
    measured = sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values() if torch.is_tensor(v))
    assert measured == expected + counters == opt.state_bytes()
    assert expected == sum(state_bytes(p.shape, tau, blocks, state_dtype or torch.float32) for p in params)


def test_the_default_is_the_recommended_preset_and_the_paper_is_one_argument_away():
    p = torch.nn.Parameter(torch.randn(3, 4))
    default, paper = Ginger([p]), Ginger([p], preset="paper")
    keys = ("betas", "tau", "blocks", "power", "damping", "relative_damping", "rho", "bias_correction", "curvature",
            "curvature_interval")
    assert {k: default.defaults[k] for k in keys} == {k: PRESETS["recommended"][k] for k in keys}
    assert {k: paper.defaults[k] for k in keys} == dict(betas=(0.9, 0.99), tau=4, blocks="tensor", power=1.0,
                                                      damping=1e-5, relative_damping=0.0, rho=1.0, bias_correction=False,
                                                      curvature="mc", curvature_interval=1)  # GINGER.md section 5
    assert paper.curvature_scale == "sqrt" and default.curvature_scale == PRESETS["recommended"]["curvature_scale"]
    mixed = Ginger([p], preset="paper", rho=None, tau=2)  # an explicit argument beats the preset
    assert mixed.defaults["rho"] is None and mixed.defaults["tau"] == 2 and mixed.defaults["damping"] == 1e-5


def test_per_group_overrides_take_effect():
    a, b = torch.nn.Parameter(torch.randn(10)), torch.nn.Parameter(torch.randn(10))
    opt = Ginger([dict(params=[a]), dict(params=[b], tau=2, lr=0.0)], tau=5, curvature="empirical")
    a.grad, b.grad = torch.randn(10), torch.randn(10)
    b_before = b.detach().clone()
    opt.step()
    assert opt.state[a]["U"].shape == (5, 10) and opt.state[b]["U"].shape == (2, 10)
    assert torch.equal(b.detach(), b_before)  # lr=0 for that group


def test_parameters_without_gradient_get_no_state():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    opt = Ginger([a, b], curvature="empirical")
    a.grad = torch.randn(3)
    opt.step()
    assert a in opt.state and b not in opt.state


@pytest.mark.parametrize("curvature", ["mc", "empirical"])
@pytest.mark.parametrize("blocks", ["row", "tensor"])
def test_empty_parameters_are_left_alone(curvature, blocks):
    """A zero-element parameter (it happens in real models) has nothing to step: the others step as usual."""
    full = torch.nn.Parameter(torch.randn(8, 16))
    empties = [torch.nn.Parameter(torch.zeros(0)), torch.nn.Parameter(torch.zeros(0, 5))]
    opt = Ginger([full, *empties], lr=1e-2, curvature=curvature, blocks=blocks)
    before = full.detach().clone()
    for _ in range(3):
        for p in (full, *empties):
            p.grad = torch.randn_like(p)
            if curvature == "mc" and opt.needs_curvature():
                p.curvature = torch.randn_like(p)
        opt.step()
    assert opt.state[full]["step"] == 3 and not torch.equal(full, before)
    assert all(p not in opt.state for p in empties)
