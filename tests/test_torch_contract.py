"""Ginger behaves as a ``torch.optim`` optimizer: named parameters, copies, a Tensor lr, error types,
checkpoints of older versions, per-group presets. Where torch has a convention, the test checks
that torch's own AdamW follows it too, so the comparison is with torch, not with an assumption."""

import copy
import io
import pickle
import warnings

import pytest
import torch

from dense_reference import DenseGinger
from ginger_hf import PRESETS, Ginger, set_curvature


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _draw(t, i, p):
    """The gradient and curvature vector of parameter ``i`` at step ``t``: they depend on nothing else."""
    gen = torch.Generator().manual_seed(1000 * t + i)
    return torch.randn(p.shape, generator=gen, dtype=p.dtype), torch.randn(p.shape, generator=gen, dtype=p.dtype)


def _step(opt, t):
    for i, p in enumerate(q for g in opt.param_groups for q in g["params"]):
        p.grad, curvature = _draw(t, i, p)
        set_curvature(p, curvature)
    opt.step()


def _params(opt):
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


# -- named parameters ---------------------------------------------------------------------

def _names_after_load(cls, saved_named: bool, loading_named: bool):
    """``param_names`` of the loading optimizer after loading a state dict, for Ginger or torch's AdamW."""
    a, b = _model(), _model()
    src = cls(a.named_parameters() if saved_named else a.parameters(), lr=1e-3)
    dst = cls(b.named_parameters() if loading_named else b.parameters(), lr=1e-3)
    dst.load_state_dict(src.state_dict())
    return dst.param_groups[0].get("param_names")


def test_named_parameters_are_kept_in_the_state_dict_as_torch_keeps_them():
    model = _model()
    opt = Ginger(model.named_parameters(), lr=1e-2, curvature="empirical")
    reference = torch.optim.AdamW(model.named_parameters(), lr=1e-2)
    names = [n for n, _ in model.named_parameters()]
    assert opt.param_groups[0]["param_names"] == names
    assert opt.state_dict()["param_groups"][0]["param_names"] == reference.state_dict()["param_groups"][0]["param_names"]
    assert all(isinstance(p, torch.Tensor) for p in opt.param_groups[0]["params"])


@pytest.mark.parametrize("saved_named,loading_named", [(True, True), (True, False), (False, True), (False, False)])
def test_named_and_unnamed_state_dicts_load_into_each_other_as_in_torch(saved_named, loading_named):
    assert _names_after_load(Ginger, saved_named, loading_named) == _names_after_load(
        torch.optim.AdamW, saved_named, loading_named)


@pytest.mark.parametrize("there,back", [(True, True), (True, False), (False, True)])
def test_a_named_round_trip_continues_bit_identically(there, back):
    """named -> named, named -> unnamed -> named, unnamed -> named: the loaded optimizer steps as the original."""
    a, b, c = _model(), _model(), _model()
    first = Ginger(a.named_parameters(), lr=1e-2, tau=2, curvature_interval=2)
    for t in range(3):
        _step(first, t)
    middle = Ginger(b.named_parameters() if there else b.parameters(), lr=1e-2, tau=2, curvature_interval=2)
    b.load_state_dict(a.state_dict())
    middle.load_state_dict(first.state_dict())
    last = Ginger(c.named_parameters() if back else c.parameters(), lr=1e-2, tau=2, curvature_interval=2)
    c.load_state_dict(b.state_dict())
    last.load_state_dict(middle.state_dict())
    for t in range(3, 6):
        _step(first, t)
        _step(last, t)
    assert all(torch.equal(x, y) for x, y in zip(_params(first), _params(last)))
    assert last.param_groups[0]["param_names"] == [n for n, _ in a.named_parameters()]


def test_named_parameters_take_per_group_settings_and_reach_the_trainer_split():
    from ginger_hf.lora import split_param_groups

    model = _model()
    named = list(model.named_parameters())
    groups = split_param_groups([{"params": named, "weight_decay": 0.1}], {id(named[1][1]): ("adamw", None)})
    opt = Ginger(groups, lr=1e-2)
    assert [g["algorithm"] for g in opt.param_groups] == ["ginger", "adamw"]
    assert opt.param_groups[1]["param_names"] == ["0.bias"]
    assert opt.param_groups[0]["param_names"] == [n for n, _ in named if n != "0.bias"]


# -- copies -------------------------------------------------------------------------------

def _torch_save_load(opt):
    buffer = io.BytesIO()
    torch.save(opt, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copy_of", [copy.deepcopy, lambda o: pickle.loads(pickle.dumps(o)), _torch_save_load],
                         ids=["deepcopy", "pickle", "torch.save"])
def test_a_copy_of_a_stepped_optimizer_continues_bit_identically(copy_of):
    model = _model()
    groups = [{"params": [model[0].weight, model[2].weight]},
              {"params": [model[0].bias, model[2].bias], "algorithm": "adamw", "weight_decay": 0.0}]
    opt = Ginger(groups, lr=1e-2, tau=2, curvature_interval=3, weight_decay=0.01, curvature_scale="sqrt",
                 backend="torch")
    opt.step_stats = {}
    for t in range(4):
        _step(opt, t)
    twin = copy_of(opt)
    assert (twin.backend, twin.curvature_scale, twin.preset) == ("torch", "sqrt", "recommended")
    assert twin.step_stats == opt.step_stats and twin.step_stats is not opt.step_stats
    assert twin.curvature_group is None
    for t in range(4, 9):  # refresh and keep steps
        _step(opt, t)
        _step(twin, t)
        assert all(torch.equal(x, y) for x, y in zip(_params(opt), _params(twin)))
    assert twin.step_stats == opt.step_stats


def test_a_copy_keeps_torch_hooks_out_as_torch_does():
    opt = Ginger(_model().parameters(), lr=1e-2, curvature="empirical")
    opt.register_step_post_hook(lambda *args: None)
    assert len(copy.deepcopy(opt)._optimizer_step_post_hooks) == len(
        copy.deepcopy(torch.optim.AdamW(_model().parameters()))._optimizer_step_post_hooks) == 0


# -- a Tensor lr --------------------------------------------------------------------------

@pytest.mark.parametrize("algorithm", ["ginger", "adamw"])
def test_a_tensor_lr_steps_as_its_float_and_follows_a_scheduler(algorithm):
    lr = torch.tensor(0.01, dtype=torch.float64)
    as_tensor = Ginger(_model().parameters(), lr=lr, tau=2, algorithm=algorithm)
    as_float = Ginger(_model().parameters(), lr=0.01, tau=2, algorithm=algorithm)
    schedules = [torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5) for o in (as_tensor, as_float)]
    for t in range(5):
        for opt, schedule in zip((as_tensor, as_float), schedules):
            _step(opt, t)
            schedule.step()
        assert all(torch.equal(x, y) for x, y in zip(_params(as_tensor), _params(as_float)))
    assert isinstance(as_tensor.param_groups[0]["lr"], torch.Tensor)  # torch's schedulers keep it a Tensor
    assert float(as_tensor.param_groups[0]["lr"]) == as_float.param_groups[0]["lr"] == 0.01 * 0.5**2


# -- error types, compared with torch's -----------------------------------------------------

def _mistakes():
    a, b = _model(), _model()
    named, plain = list(a.named_parameters()), list(b.parameters())
    return {
        "empty parameter list": (lambda cls: cls([]), ValueError),
        "a single Tensor": (lambda cls: cls(plain[0]), TypeError),
        "a set of parameters in a group": (lambda cls: cls([{"params": set(plain)}]), TypeError),
        "names missing in a group": (lambda cls: cls([named[0], plain[1]]), ValueError),
        "a named and an unnamed group": (lambda cls: cls([{"params": named[:2]}, {"params": plain[2:]}]), ValueError),
        "a parameter in two groups": (lambda cls: cls([{"params": plain[:2]}, {"params": plain[1:]}]), ValueError),
        "a non-leaf tensor": (lambda cls: cls([plain[0] * 2]), ValueError),
        "a negative lr": (lambda cls: cls(plain, lr=-1.0), ValueError),
        "a Tensor lr of two elements": (lambda cls: cls(plain, lr=torch.tensor([0.1, 0.2])), ValueError),
        "a bad beta": (lambda cls: cls(plain, betas=(1.5, 0.99)), ValueError),
    }


@pytest.mark.parametrize("mistake", list(_mistakes()))
def test_mistakes_raise_the_error_type_torch_raises(mistake):
    build, expected = _mistakes()[mistake]
    with pytest.raises(expected):
        build(torch.optim.AdamW)
    with pytest.raises(expected):
        build(Ginger)


def test_a_bad_group_added_later_leaves_the_optimizer_untouched():
    a, b = _model(), _model()
    opt = Ginger(a.named_parameters(), lr=1e-2)
    before = copy.deepcopy(opt.param_groups)
    for bad in ({"params": list(b.parameters())}, {"params": list(b.named_parameters()), "preset": "adam"}):
        with pytest.raises(ValueError):
            opt.add_param_group(bad)
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["param_names"] == before[0]["param_names"]


# -- checkpoints of older versions ----------------------------------------------------------

def _old_checkpoint(shapes, *, step, tau, interval, generator):
    """A state dict as ginger-hf saved it before 2026-12-02 (the paper's method only; flat per-tensor state)."""
    state = {}
    for i, shape in enumerate(shapes):
        d = torch.Size(shape).numel()
        n = min(tau, d)
        U = torch.linalg.qr(torch.randn(d, n, generator=generator, dtype=torch.float64))[0].T.contiguous()
        rotation = torch.linalg.qr(torch.randn(n, n, generator=generator, dtype=torch.float64))[0]
        state[i] = {"m": torch.randn(d, generator=generator, dtype=torch.float64) * 0.1, "U": U,
                    "s": torch.rand(n, generator=generator, dtype=torch.float64) * 2, "R": rotation,
                    "step": step, "skipped": 0}
    group = {"lr": 1e-2, "betas": (0.9, 0.99), "tau": tau, "damping": 1e-3, "rho": 1.0, "weight_decay": 0.01,
             "curvature": "mc", "curvature_interval": interval, "state_dtype": None, "algorithm": "ginger",
             "eps": 1e-8, "joint": False, "params": list(range(len(shapes)))}
    return {"state": state, "param_groups": [group]}


@pytest.mark.parametrize("interval", [1, 2])
def test_an_old_checkpoint_loads_with_its_old_meaning_and_steps_as_the_paper(interval):
    gen = torch.Generator().manual_seed(5)
    model = _model().double()
    shapes = [p.shape for p in model.parameters()]
    saved = _old_checkpoint(shapes, step=3, tau=2, interval=interval, generator=gen)
    opt = Ginger(model.parameters(), lr=0.5)  # today's defaults: the checkpoint's settings must win
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.load_state_dict(saved)
    assert len([w for w in caught if "before 2026-12-02" in str(w.message)]) == 1
    group = opt.param_groups[0]
    assert {k: group[k] for k in ("power", "relative_damping", "bias_correction", "blocks")} == dict(
        power=1.0, relative_damping=0.0, bias_correction=False, blocks="tensor")
    assert group["lr"] == 1e-2 and opt.curvature_scale == PRESETS["paper"]["curvature_scale"]

    dense = DenseGinger(shapes, lr=1e-2, betas=(0.9, 0.99), tau=2, damping=1e-3, rho=1.0, weight_decay=0.01,
                        curvature_interval=interval)
    for i, st in saved["state"].items():  # the same model G in the reference: L = (R U)^T diag(s) (R U)
        basis = st["R"] @ st["U"]
        dense.L[i][0] = (basis.T * st["s"]) @ basis
        dense.m[i] = st["m"].clone()
    dense.t, dense.q = 3, -(-3 // interval)
    thetas = [p.detach().clone() for p in model.parameters()]
    for t in range(4):
        _step(opt, t)
        grads, curvs = zip(*(_draw(t, i, p) for i, p in enumerate(model.parameters())))
        thetas = dense.step(thetas, grads, curvs)
        for p, theta in zip(model.parameters(), thetas):
            torch.testing.assert_close(p.detach().reshape(-1), theta, rtol=1e-10, atol=1e-12)
    assert all(opt.state[p]["step"] == 7 for p in model.parameters())


def test_an_old_joint_group_loads_as_one_concatenated_parameter():
    """A joint group's old state (on its first parameter) steps as the same state on one flat parameter."""
    a = torch.nn.Parameter(torch.randn(3, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    b = torch.nn.Parameter(torch.randn(4, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    flat = torch.nn.Parameter(torch.cat([a.detach().reshape(-1), b.detach()]))
    saved = _old_checkpoint([(10,)], step=2, tau=2, interval=1, generator=torch.Generator().manual_seed(3))
    joint_saved = copy.deepcopy(saved)
    joint_saved["param_groups"][0].update(joint=True, params=[0, 1])
    joint, single = Ginger([{"params": [a, b], "joint": True}]), Ginger([flat])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        joint.load_state_dict(joint_saved)
        single.load_state_dict(saved)
    assert joint.state[a]["U"].shape == (2, 10) and b not in joint.state
    for t in range(3):
        for p, (g, c) in zip((a, b), (_draw(t, 0, a), _draw(t, 1, b))):
            p.grad = g
            set_curvature(p, c)
        flat.grad = torch.cat([a.grad.reshape(-1), b.grad])
        set_curvature(flat, torch.cat([_draw(t, 0, a)[1].reshape(-1), _draw(t, 1, b)[1]]))
        joint.step()
        single.step()
        torch.testing.assert_close(torch.cat([a.detach().reshape(-1), b.detach()]), flat.detach(), rtol=1e-12, atol=1e-14)


def test_a_checkpoint_with_every_key_loads_without_a_warning():
    a, b = _model(), _model()
    first = Ginger(a.parameters(), lr=1e-2)
    second = Ginger(b.parameters(), lr=1e-2, preset="paper")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second.load_state_dict(first.state_dict())
    assert second.param_groups[0]["blocks"] == "row" and second.curvature_scale == "sqrt"  # the attribute stays


# -- per-group presets ------------------------------------------------------------------------

def test_a_group_preset_fills_the_keys_the_group_does_not_name():
    model = _model()
    opt = Ginger([{"params": [model[0].weight], "preset": "paper", "curvature": "empirical", "tau": 3},
                  {"params": [model[0].bias, model[2].weight, model[2].bias]}], lr=1e-2)
    paper, default = opt.param_groups
    assert "preset" not in paper and "preset" not in default
    expected = {k: v for k, v in PRESETS["paper"].items() if k != "curvature_scale"}
    assert {k: paper[k] for k in expected} == {**expected, "curvature": "empirical", "tau": 3}
    assert {k: default[k] for k in expected} == {k: PRESETS["recommended"][k] for k in expected}
    assert paper["lr"] == default["lr"] == 1e-2


def test_a_group_preset_steps_as_that_preset():
    a, b = _model(), _model()
    mixed = Ginger([{"params": list(a.parameters()), "preset": "paper"}], lr=1e-2, curvature_scale="sqrt")
    whole = Ginger(b.parameters(), lr=1e-2, preset="paper")
    for t in range(3):
        _step(mixed, t)
        _step(whole, t)
    assert all(torch.equal(x, y) for x, y in zip(_params(mixed), _params(whole)))


def test_a_group_preset_that_needs_another_curvature_scale_is_refused():
    model = _model()
    with pytest.raises(ValueError, match=r"preset='paper' and curvature='mc' needs curvature_scale='sqrt'"):
        Ginger([{"params": list(model.parameters()), "preset": "paper"}], lr=1e-2)
    with pytest.raises(ValueError, match=r"preset must be one of \('recommended', 'paper'\)"):
        Ginger([{"params": list(model.parameters()), "preset": "adam"}], lr=1e-2)
