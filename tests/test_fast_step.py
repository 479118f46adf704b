"""The fast step (``ginger_hf.fused``) against the reference (``ginger_hf.functional``) and the dense oracle.

Every backend that runs on CPU (the C++ kernel, eager torch, torch.compile through inductor),
both block kinds, the paper's and the recommended configuration, refresh and keep steps,
and the degenerate refreshes, which must take the fast path (no reference hand-over).
"""

import copy
import shutil

import pytest
import torch
from dense_reference import DenseGinger
from helpers import orthonormality_error, relative_error

from ginger_hf import functional as F
from ginger_hf import device_step, fused, kernel
from ginger_hf.functional import Hyper

SHAPES = [(), (1,), (7,), (5, 4), (64, 33), (3, 70), (5000,)]  # scalars, d <= tau, rows, several chunks
ROWS = [(64, 33), (40, 70), (7,), (5, 4), (1,), (200, 16)]  # many small blocks: the kernel takes a whole step
PAPER = dict(power=1.0, damping=0.05, relative_damping=0.0, bias_correction=False, rho=0.5, weight_decay=0.1)
RECOMMENDED = dict(power=0.5, damping=1e-12, relative_damping=0.1, bias_correction=True, rho=None, weight_decay=0.0)
CONFIGS = {"paper": PAPER, "recommended": RECOMMENDED}
# (backend, parameter/state dtype, tolerance): what each precision achieves, with margin.
PRECISIONS = [("kernel", torch.float32, 2e-6), ("torch", torch.float32, 2e-6), ("torch", torch.float64, 1e-11)]
BETA1 = 0.9


def make(shapes, tau, dtype, state_dtype=None, blocks="tensor", seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    states = [F.init_state(p, tau, blocks, state_dtype or dtype) for p in params]
    return params, states


def hypers(n, blocks="tensor", lr=0.02, beta2=0.95, damping=0.05, **config):
    return [Hyper(lr=lr, beta2=beta2, damping=damping, blocks=blocks, **config)] * n


def draw(params, gen, refresh: bool):
    grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
    curvs = [(2 * torch.randn(p.shape, generator=gen, dtype=torch.float64)).to(p.dtype) if refresh else None
             for p in params]
    return grads, curvs


def run(fn, params, states, hp, steps, *, interval=1, seed=1, **kw):
    gen = torch.Generator().manual_seed(seed)
    for t in range(steps):
        grads, curvs = draw(params, gen, t % interval == 0)
        fn(params, grads, curvs, states, hp, beta1=BETA1, **kw)


def curvature_model(state):
    """Each block's ``(R U)^T diag(s) (R U)``: independent of eigenvector signs and rotations in ties."""
    B, n = state["s"].shape
    E = state["R"] @ state["U"].double().reshape(n, B, -1).transpose(0, 1)
    return E.mT @ (state["s"][..., None] * E)


def assert_close(fast, ref, tol):
    """Parameters and momenta to ``tol``; the curvature model (eigenvalues, ``U^T diag(s) U``, ``e``) to
    ``10 tol``: two float32 implementations' rounding compounds through its eigen-updates."""
    for p1, p2, s1, s2 in zip(fast[0], ref[0], fast[1], ref[1]):
        assert p1.dtype == p2.dtype and s1["U"].dtype == s2["U"].dtype and s1["s"].dtype == torch.float64
        assert relative_error(p1, p2) <= tol, ("param", p1.shape, relative_error(p1, p2))
        assert relative_error(s1["m"], s2["m"]) <= tol, ("m", p1.shape)
        assert relative_error(s1["s"], s2["s"]) <= 10 * tol, ("s", p1.shape)
        assert relative_error(s1["e"], s2["e"]) <= 10 * tol, ("e", p1.shape)
        if p1.numel() // max(s1["s"].shape[0], 1) <= 4096:  # the dense k x k model of small blocks
            assert relative_error(curvature_model(s1), curvature_model(s2)) <= 10 * tol, ("U^T diag(s) U", p1.shape)
        for key in ("step", "curvature_steps", "skipped", "curvature_skipped"):
            assert s1[key] == s2[key], key


@pytest.mark.parametrize("backend,dtype,tol", PRECISIONS)
@pytest.mark.parametrize("tau", [1, 4, 10])
@pytest.mark.parametrize("blocks", ["tensor", "row"])
@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("interval", [1, 3])
def test_matches_reference(backend, dtype, tol, tau, blocks, config, interval):
    """Refresh and keep steps past truncation (3*tau+4 steps), with each configuration's levers."""
    ref = make(SHAPES, tau, dtype, blocks=blocks)
    fast = copy.deepcopy(ref)
    hp = hypers(len(SHAPES), blocks, **CONFIGS[config])
    run(F.ginger, *ref, hp, 3 * tau + 4, interval=interval)
    run(fused.ginger, *fast, hp, 3 * tau + 4, interval=interval, backend=backend)
    assert_close(fast, ref, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-6)])
@pytest.mark.parametrize("blocks", ["tensor", "row"])
def test_compiled_passes_match_reference(dtype, tol, blocks):
    """The torch.compile path (the default on CUDA), compiled here by inductor for CPU; refresh and keep steps."""
    ref = make(SHAPES, 4, dtype, blocks=blocks)
    fast = copy.deepcopy(ref)
    hp = hypers(len(SHAPES), blocks, **RECOMMENDED)
    run(F.ginger, *ref, hp, 12, interval=3)
    run(fused.ginger, *fast, hp, 12, interval=3, backend="compile")
    assert_close(fast, ref, tol)
    assert not device_step._compile_failed


def _degenerate(kind, c_prev, U, gen):
    """A curvature vector of one of the degenerate kinds, given the last one and the current basis rows."""
    if kind == "repeated":
        return c_prev.clone()
    if kind == "zero":
        return torch.zeros_like(c_prev)
    residual = float(kind)
    inside = U.T @ torch.randn(U.shape[0], generator=gen, dtype=torch.float64)
    noise = torch.randn(c_prev.shape, generator=gen, dtype=torch.float64)
    return inside + residual * inside.norm() * noise / noise.norm()


@pytest.mark.parametrize("backend,dtype,tol", PRECISIONS)
@pytest.mark.parametrize("kind", ["repeated", "zero", "1e-7", "1e-3", "3e-2"])
def test_degenerate_refreshes_take_the_fast_path_and_stay_exact(monkeypatch, backend, dtype, tol, kind):
    """A repeated gradient, a zero vector, c within 1e-7..3e-2 of span(U), and blocks with d <= tau.

    The fast step must handle them itself (the reference update is made unreachable) and
    agree with the dense float64 oracle. The one documented approximation: a residual at or
    below ``in_span_tolerance`` (1e-7 in float64) is dropped, which tilts the model by at
    most ``(1 - beta2) * 1e-7`` relative.
    """
    monkeypatch.setattr(F, "update_curvature", None)  # any hand-over to the reference would raise
    shapes = [(3,), (2, 2), (40,), (6, 9)]
    tau, lr, beta2 = 4, 0.02, 0.95
    params, states = make(shapes, tau, dtype, blocks="row")
    hp = hypers(len(shapes), "row", lr=lr, beta2=beta2, **RECOMMENDED)
    dense = DenseGinger(shapes, lr=lr, betas=(BETA1, beta2), tau=tau, rho=None, weight_decay=0.0, blocks="row",
                        **{k: RECOMMENDED[k] for k in ("power", "damping", "relative_damping", "bias_correction")})
    thetas = [p.double().reshape(-1).clone() for p in params]
    gen = torch.Generator().manual_seed(7)
    last = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
    for t in range(12):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        curvs = []
        for c_prev, p, st in zip(last, params, states):
            if t < 5:  # fill the basis first
                c = torch.randn(p.shape, generator=gen, dtype=torch.float64)
            else:
                B, n = st["s"].shape
                U = (st["R"] @ st["U"].double().reshape(n, B, -1).transpose(0, 1))  # (B, n, k) eigenbasis rows
                c = torch.stack([_degenerate(kind, c_prev.reshape(B, -1)[b], U[b], gen) for b in range(B)]).view(p.shape)
            curvs.append(c)
        last = curvs
        thetas = dense.step(thetas, grads, curvs)
        fused.ginger(params, [g.to(dtype) for g in grads], [c.to(dtype) for c in curvs], states, hp, beta1=BETA1,
                     backend=backend)
    bound = 1e-8 if dtype == torch.float64 and kind == "1e-7" else tol  # the dropped residual
    for p, theta in zip(params, thetas):
        assert relative_error(p, theta) <= bound, (p.shape, relative_error(p, theta))


@pytest.mark.parametrize("backend", ["kernel", "torch", "compile"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_gradient_skips_the_tensor_untouched(backend, state_dtype, bad):
    params, states = make(SHAPES, 4, torch.float32, state_dtype, blocks="row")
    hp = hypers(len(SHAPES), "row", **RECOMMENDED)
    run(fused.ginger, params, states, hp, 2, backend=backend)
    before = copy.deepcopy((params, states))
    grads, curvs = draw(params, torch.Generator().manual_seed(9), True)
    victim = 4
    grads[victim].view(-1)[1000] = bad
    fused.ginger(params, grads, curvs, states, hp, beta1=BETA1, backend=backend)
    for i, (p0, s0, p1, s1) in enumerate(zip(*before, params, states)):
        same = torch.equal(p0, p1) and all(torch.equal(s0[k], s1[k]) for k in ("m", "U", "s", "R", "e"))
        assert same == (i == victim) or p0.numel() == 0, i
        assert s1["skipped"] == s0["skipped"] + (i == victim)
        assert s1["step"] == s0["step"] + (i != victim)


@pytest.mark.parametrize("backend", ["kernel", "torch", "compile"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_curvature_skips_only_the_refresh(backend, bad):
    """A finite gradient still moves the parameter with the existing model; all state stays finite."""
    params, states = make(SHAPES, 4, torch.float32, blocks="row")
    hp = hypers(len(SHAPES), "row", **RECOMMENDED)
    run(fused.ginger, params, states, hp, 3, backend=backend)
    ref = copy.deepcopy((params, states))
    grads, curvs = draw(params, torch.Generator().manual_seed(9), True)
    victim = 4
    curvs[victim].view(-1)[1000] = bad
    before = params[victim].clone()
    fused.ginger(params, grads, curvs, states, hp, beta1=BETA1, backend=backend)
    assert not torch.equal(params[victim], before)
    # the reference takes the same step with no curvature vector for the victim
    ref_curvs = [None if i == victim else c for i, c in enumerate(curvs)]
    F.ginger(ref[0], grads, ref_curvs, ref[1], hp, beta1=BETA1)
    st = states[victim]
    assert st["curvature_skipped"] == 1 and st["step"] == 4 and st["curvature_steps"] == 3
    assert all(torch.isfinite(st[k]).all() for k in ("m", "U", "s", "R", "e"))
    for p1, p2 in zip(params, ref[0]):
        assert relative_error(p1, p2) <= 2e-6
    assert relative_error(curvature_model(st), curvature_model(ref[1][victim])) <= 2e-6


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shapes", [SHAPES, ROWS], ids=["two passes", "whole step"])
def test_bfloat16_state_and_parameters(backend, param_dtype, shapes):
    """bf16 m/U (or bf16 parameters with float32 state) agree with the reference to bf16 rounding."""
    state_dtype = torch.bfloat16 if param_dtype == torch.float32 else torch.float32
    ref = make(shapes, 4, param_dtype, state_dtype, blocks="row")
    fast = copy.deepcopy(ref)
    hp = hypers(len(shapes), "row", **RECOMMENDED)
    run(F.ginger, *ref, hp, 6)
    run(fused.ginger, *fast, hp, 6, backend=backend)
    for p1, p2, s1, s2 in zip(fast[0], ref[0], fast[1], ref[1]):
        assert p1.dtype == param_dtype and s1["m"].dtype == state_dtype and s1["U"].dtype == state_dtype
        assert relative_error(p1, p2) <= 2e-2
        assert relative_error(s1["m"], s2["m"]) <= 2e-2
        assert orthonormality_error(s1) <= (5e-2 if state_dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("blocks", ["tensor", "row"])
def test_eigenbasis_stays_orthonormal_over_many_float32_steps(backend, blocks):
    """800 float32 steps, curvature norms 1e-6..1e6, a third of them within 1e-7..3e-2 of span(U).

    What the model uses is the eigenbasis ``R U`` (the stored ``U`` alone may drift inside its span).
    """
    gen = torch.Generator().manual_seed(3)
    shapes = [(48,), (3,), (700,), (16, 20)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    states = [F.init_state(p, 4, blocks, torch.float32) for p in params]
    worst = 0.0
    for t in range(800):
        norm = 10.0 ** (-6 + 12 * torch.rand((), generator=gen).item())
        hp = hypers(len(shapes), blocks, lr=1e-4, beta2=0.99, **dict(PAPER, damping=[1e-8, 1e-5, 1e-2, 1.0][t % 4]))
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        curvs = []
        for p, st in zip(params, states):
            B, n = st["s"].shape
            c = torch.randn(B, p.numel() // B, generator=gen)
            if t % 3 == 1:
                U = st["R"].float() @ st["U"].reshape(n, B, -1).transpose(0, 1)
                c = (U.mT @ torch.randn(B, n, 1, generator=gen))[..., 0] + [1e-7, 1e-3, 3e-2][(t // 3) % 3] * c
            curvs.append((c * (norm / c.norm())).view(p.shape))
        fused.ginger(params, grads, curvs, states, hp, beta1=BETA1, backend=backend)
        if t % 20 == 0 or t > 790:
            for st in states:
                assert all(torch.isfinite(st[k]).all() for k in ("m", "U", "s", "R"))
                assert (st["s"] >= 0).all()
                worst = max(worst, orthonormality_error(st))
            assert worst <= 1e-5, (t, worst)


@pytest.mark.parametrize("shapes", [[(300_000,), (3000, 64), (5,)], [(3000, 64), (500, 100), (5,)]],
                         ids=["two passes", "whole step"])
def test_kernel_splits_work_between_two_threads(whole_steps, shapes):
    """One huge block and thousands of rows (two passes, the huge block split between threads), or rows
    only (whole steps, rows dealt to threads), on 2 threads: the same result as 1 thread and the reference."""
    hp = hypers(len(shapes), "row", **RECOMMENDED)
    ref = make(shapes, 4, torch.float32, blocks="row")
    one, two = copy.deepcopy(ref), copy.deepcopy(ref)
    run(F.ginger, *ref, hp, 3)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        run(fused.ginger, *one, hp, 3, backend="kernel")
        torch.set_num_threads(2)
        run(fused.ginger, *two, hp, 3, backend="kernel")
    finally:
        torch.set_num_threads(threads)
    # one thread always takes whole steps; with two, the huge block takes the two passes
    assert len(whole_steps) == (3 if shapes[0] == (300_000,) else 6)
    assert_close(two, ref, 2e-6)
    assert_close(two, one, 2e-6)


def test_kernel_is_built_and_used_where_a_compiler_exists():
    """The fast path must really be taken on CPU float32 when a C++ compiler is installed."""
    has_compiler = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    assert kernel.available() == bool(has_compiler)
    p = torch.zeros(4, 40)
    st = F.init_state(p, 4, "row", torch.float32)
    assert kernel.applies(p, st["m"], st["U"], p, p) == bool(has_compiler)
    st64 = F.init_state(p.double(), 4, "row", torch.float64)
    assert not kernel.applies(p.double(), st64["m"], st64["U"], p.double(), None)


def test_statistics_match_the_step_they_describe():
    """update_sq, span_sq and clipped, against the update the reference takes (no clip, then with rho)."""
    for rho in (None, 1e-3):
        config = dict(RECOMMENDED, rho=rho)
        params, states = make([(6, 9), (40,)], 4, torch.float64, blocks="row")
        hp = hypers(2, "row", lr=1.0, **config)
        run(fused.ginger, params, states, hp, 3, backend="torch")
        ref = copy.deepcopy((params, states))
        grads, curvs = draw(params, torch.Generator().manual_seed(2), True)
        stats = {}
        fused.ginger(params, grads, curvs, states, hp, beta1=BETA1, backend="torch", stats=stats)
        unclipped = copy.deepcopy(ref)
        F.ginger(unclipped[0], grads, curvs, unclipped[1], hypers(2, "row", lr=1.0, **dict(config, rho=None)),
                 beta1=BETA1)
        u = [(p0 - p1).reshape(-1) for p0, p1 in zip(ref[0], unclipped[0])]
        assert abs(stats["update_sq"] - sum(float(x @ x) for x in u)) <= 1e-9 * stats["update_sq"]
        assert abs(stats["grad_sq"] - sum(float(g.reshape(-1) @ g.reshape(-1)) for g in grads)) <= 1e-9 * stats["grad_sq"]
        span = 0.0
        for x, st in zip(u, unclipped[1]):
            B, n = st["s"].shape
            E = st["R"] @ st["U"].reshape(n, B, -1).transpose(0, 1)
            span += float(((E @ x.view(B, -1, 1)) ** 2).sum())
        assert abs(stats["span_sq"] - span) <= 1e-9 * stats["update_sq"]
        expected = 0 if rho is None else sum(int((x.abs() > rho).sum()) for x in u)
        assert stats["clipped"] == expected and stats["numel"] == 6 * 9 + 40


def test_rejects_unknown_backend():
    params, states = make([(3,)], 2, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        fused.ginger(params, params, [None], states, hypers(1), beta1=BETA1, backend="cuda-graph")


# -- the kernel's whole step (one call: each block's passes and solve at once) -----------------------------



@pytest.fixture
def whole_steps(monkeypatch):
    """Counts the kernel's whole-step calls (and lets them run)."""
    calls = []
    step = kernel.step

    def spy(*args, **kwargs):
        calls.append(1)
        return step(*args, **kwargs)

    monkeypatch.setattr(kernel, "step", spy)
    return calls


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("interval", [1, 3])
def test_whole_step_matches_reference(whole_steps, config, interval):
    ref = make(ROWS, 4, torch.float32, blocks="row")
    fast = copy.deepcopy(ref)
    hp = hypers(len(ROWS), "row", **CONFIGS[config])
    run(F.ginger, *ref, hp, 16, interval=interval)
    run(fused.ginger, *fast, hp, 16, interval=interval, backend="kernel")
    assert len(whole_steps) == 16
    assert_close(fast, ref, 2e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("which", ["gradient", "curvature"])
def test_whole_step_takes_the_decisions_of_the_two_passes(whole_steps, bad, which):
    """A non-finite gradient leaves its tensor untouched, a non-finite curvature vector skips only the
    refresh: the same state and counters as the reference given the same decisions."""
    params, states = make(ROWS, 4, torch.float32, blocks="row")
    hp = hypers(len(ROWS), "row", **RECOMMENDED)
    run(fused.ginger, params, states, hp, 3, backend="kernel")
    ref = copy.deepcopy((params, states))
    grads, curvs = draw(params, torch.Generator().manual_seed(9), True)
    victim = 1
    (grads if which == "gradient" else curvs)[victim].view(-1)[777] = bad
    fused.ginger(params, grads, curvs, states, hp, beta1=BETA1, backend="kernel")
    assert len(whole_steps) == 4
    if which == "gradient":  # the reference has no notion of a skipped tensor: step the others only
        keep = [i for i in range(len(ROWS)) if i != victim]
        F.ginger([ref[0][i] for i in keep], [grads[i] for i in keep], [curvs[i] for i in keep],
                 [ref[1][i] for i in keep], [hp[i] for i in keep], beta1=BETA1)
        ref[1][victim]["skipped"] += 1
    else:
        F.ginger(ref[0], grads, [None if i == victim else c for i, c in enumerate(curvs)], ref[1], hp, beta1=BETA1)
        ref[1][victim]["curvature_skipped"] += 1
    assert_close((params, states), ref, 2e-6)
    for st in states:
        assert all(torch.isfinite(st[k].float()).all() for k in ("m", "U", "s", "R", "e"))


def test_whole_step_leaves_a_block_whose_momentum_overflows_untouched(whole_steps):
    """A finite gradient whose momentum overflows float32 (m' = inf) must not poison the state."""
    params, states = make(ROWS, 4, torch.float32, blocks="row")
    hp = hypers(len(ROWS), "row", **RECOMMENDED)
    run(fused.ginger, params, states, hp, 2, backend="kernel")
    states[0]["m"][3].fill_(3e38)
    grads, curvs = draw(params, torch.Generator().manual_seed(4), False)
    grads[0][3].fill_(-3e38)  # m + w1 (g - m) overflows
    before = copy.deepcopy((params[0][3], states[0]["m"][3], states[0]["e"][3], params[0][2]))
    fused.ginger(params, grads, curvs, states, hp, beta1=BETA1, backend="kernel")
    assert torch.equal(params[0][3], before[0]) and torch.equal(states[0]["m"][3], before[1])
    assert torch.equal(states[0]["e"][3], before[2])
    assert not torch.equal(params[0][2], before[3])  # the tensor's other rows step
    for st in states:
        assert all(torch.isfinite(st[k]).all() for k in ("U", "s", "R", "e"))


def test_whole_step_statistics_match_the_two_passes(whole_steps):
    for rho in (None, 1e-3):
        config = dict(RECOMMENDED, rho=rho)
        params, states = make(ROWS, 4, torch.float32, blocks="row")
        hp = hypers(len(ROWS), "row", lr=1.0, **config)
        run(fused.ginger, params, states, hp, 3, backend="kernel")
        other = copy.deepcopy((params, states))
        grads, curvs = draw(params, torch.Generator().manual_seed(2), True)
        stats, expected = {}, {}
        fused.ginger(params, grads, curvs, states, hp, beta1=BETA1, backend="kernel", stats=stats)
        fused.ginger(*other[:1], grads, curvs, other[1], hp, beta1=BETA1, backend="torch", stats=expected)
        for key in ("update_sq", "span_sq", "grad_sq"):
            assert abs(stats[key] - expected[key]) <= 1e-5 * expected[key], key
        assert abs(stats["clipped"] - expected["clipped"]) <= 2 and stats["numel"] == expected["numel"]
        assert (rho is None) == (stats["clipped"] == 0)
