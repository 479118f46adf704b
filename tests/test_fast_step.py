"""The two-pass fast step (ginger_hf.fused) against the reference ``functional.ginger``."""

import copy
import shutil

import pytest
import torch

from ginger_hf import functional as F
from ginger_hf import fused

BACKENDS = [None, "torch"]  # None: the C++ kernel where it applies (float32/bfloat16 on CPU)
SHAPES = [(), (1,), (7,), (5, 4), (64, 33), (5000,)]  # scalars, d < tau, vector tails, several kernel blocks
HP = dict(lr=0.02, beta1=0.9, beta2=0.95, damping=0.05, rho=0.5, weight_decay=0.1)


def make_blocks(shapes, tau, dtype, state_dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    states = [F.init_block_state(p, tau, state_dtype) for p in params]
    return params, states


def run(fn, params, states, steps, *, interval=1, seed=1, in_span_every=0, hp=HP, **kw):
    """``steps`` steps; curvature on steps 1, 1+interval, ...; every ``in_span_every``-th one almost in span(U)."""
    gen = torch.Generator().manual_seed(seed)
    for t in range(1, steps + 1):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) for p in params]
        curvs = []
        for p, st in zip(params, states):
            if (t - 1) % interval:
                curvs.append(None)
                continue
            c = 2 * torch.randn(p.numel(), generator=gen, dtype=torch.float64)
            if in_span_every and t % in_span_every == 0:
                U = st["U"].double()  # project: the same c whatever signs/rotation the basis has
                c = U.T @ (U @ torch.randn(p.numel(), generator=gen, dtype=torch.float64)) + 1e-3 * c / c.norm()
            curvs.append(c.view(p.shape).to(p.dtype))
        fn(params, grads, curvs, [s["m"] for s in states], [s["U"] for s in states], [s["s"] for s in states],
           [s["R"] for s in states], [t] * len(params), **hp, **kw)


def rel(a, b):
    a, b = a.double().reshape(-1), b.double().reshape(-1)
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def eigenbasis(st):
    """The eigenbasis ``R U`` (rows) of a block's state, in float64."""
    return st["R"] @ st["U"].double()


def curvature_model(st):
    """``U^T diag(s) U``: independent of the eigenvector signs and of rotations within equal eigenvalues."""
    U = eigenbasis(st)
    return U.T @ (st["s"][:, None] * U)


def assert_close(fast, ref, tol):
    (pf, sf), (pr, sr) = fast, ref
    for p1, p2, s1, s2 in zip(pf, pr, sf, sr):
        assert p1.dtype == p2.dtype and s1["U"].dtype == s2["U"].dtype and s1["s"].dtype == torch.float64
        assert rel(p1, p2) <= tol, ("param", p1.shape, rel(p1, p2))
        assert rel(s1["m"], s2["m"]) <= tol, ("m", p1.shape)
        assert rel(s1["s"], s2["s"]) <= tol, ("s", p1.shape, s1["s"], s2["s"])
        assert rel(curvature_model(s1), curvature_model(s2)) <= tol, ("U diag(s) U^T", p1.shape)


def orthonormality_error(U):
    U = U.double()
    return (U @ U.T - torch.eye(U.shape[0], dtype=torch.float64)).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("tau", [1, 4, 6, 8, 16])  # the kernel tiles ranks by 4: 6 has a partial tile
@pytest.mark.parametrize("interval", [1, 3])
def test_matches_reference(backend, dtype, tol, tau, interval):
    """Refresh and non-refresh steps, past truncation (3*tau+4 steps), with rho and weight decay."""
    ref = make_blocks(SHAPES, tau, dtype, dtype)
    fast = copy.deepcopy(ref)
    steps = 3 * tau + 4
    run(F.ginger, *ref, steps, interval=interval)
    run(fused.ginger, *fast, steps, interval=interval, backend=backend)
    assert_close(fast, ref, tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_compiled_passes_match_reference(dtype, tol):
    """The torch.compile path (the default on CUDA), compiled here by inductor for CPU; refresh and non-refresh steps."""
    ref = make_blocks(SHAPES, 4, dtype, dtype)
    fast = copy.deepcopy(ref)
    run(F.ginger, *ref, 16, interval=3)
    run(fused.ginger, *fast, 16, interval=3, backend="compile")
    assert_close(fast, ref, tol)
    assert not fused._compile_failed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 1e-4)])
@pytest.mark.parametrize("residual", [1e-7, 1e-3, 3e-2])
def test_curvature_near_the_span(backend, dtype, tol, residual):
    """c within ``residual`` of span(U) (the cancelling case), rho=None, no weight decay.

    Each step starts both implementations from the same state (the basis inside an
    eigenvalue-0 subspace is arbitrary, so long runs may pick different spans).
    """
    hp = dict(HP, rho=None, weight_decay=0.0)
    gen = torch.Generator().manual_seed(5)
    fast = make_blocks(SHAPES, 4, dtype, dtype)
    for t in range(1, 9):
        ref = copy.deepcopy(fast)
        grads = [torch.randn(p.shape, generator=gen, dtype=dtype) for p in fast[0]]
        curvs = []
        for p, st in zip(*fast):
            U = st["U"].double()
            c = torch.randn(p.numel(), generator=gen, dtype=torch.float64)
            if t % 2 == 0:
                c = U.T @ torch.randn(U.shape[0], generator=gen, dtype=torch.float64) + residual * c / c.norm()
            curvs.append(c.view(p.shape).to(dtype))
        for fn, (params, states), kw in ((F.ginger, ref, {}), (fused.ginger, fast, dict(backend=backend))):
            fn(params, grads, curvs, [s["m"] for s in states], [s["U"] for s in states], [s["s"] for s in states],
               [s["R"] for s in states], [t] * len(params), **hp, **kw)
        assert_close(fast, ref, tol)


@pytest.mark.parametrize("backend", [*BACKENDS, "compile"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("where", ["grad", "curvature", "none"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_blocks_are_reported_and_left_untouched(backend, state_dtype, where, bad):
    """Pass 1 finds the non-finite input; the block (parameter and state) stays bit-identical, the others step."""
    params, states = make_blocks(SHAPES, 4, torch.float32, state_dtype)
    run(fused.ginger, params, states, 2, backend=backend)  # non-trivial state first
    before = copy.deepcopy((params, states))
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    curvs = [torch.randn(p.shape, generator=gen) for p in params] if where != "none" else [None] * len(params)
    victim = 4  # the (64, 33) block
    target = grads if where in ("grad", "none") else curvs
    target[victim].view(-1)[1000] = bad
    applied = fused.ginger(params, grads, curvs, [s["m"] for s in states], [s["U"] for s in states],
                           [s["s"] for s in states], [s["R"] for s in states], [3] * len(params), **HP, backend=backend)
    assert applied == [i != victim for i in range(len(params))]
    for i, (p0, s0, p1, s1) in enumerate(zip(*before, params, states)):
        same = torch.equal(p0, p1) and all(torch.equal(s0[k], s1[k]) for k in ("m", "U", "s"))
        assert same == (i == victim) or p0.numel() == 0, i


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_state_and_parameters(backend, param_dtype):
    """bf16 m/U (or bf16 parameters with float32 state) agree with the reference to bf16 rounding."""
    state_dtype = torch.bfloat16 if param_dtype == torch.float32 else torch.float32
    ref = make_blocks(SHAPES, 4, param_dtype, state_dtype)
    fast = copy.deepcopy(ref)
    run(F.ginger, *ref, 6)
    run(fused.ginger, *fast, 6, backend=backend)
    pf, sf = fast
    pr, sr = ref
    for p1, p2, s1, s2 in zip(pf, pr, sf, sr):
        assert p1.dtype == param_dtype and s1["m"].dtype == state_dtype and s1["U"].dtype == state_dtype
        assert rel(p1, p2) <= 2e-2
        assert rel(s1["m"], s2["m"]) <= 2e-2
        assert orthonormality_error(s1["U"]) <= (5e-2 if state_dtype == torch.bfloat16 else 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_orthonormal_over_many_float32_steps(backend):
    """800 float32 steps, curvature norms 1e-6..1e6, damping 1e-8..1, a third of them almost in span(U)."""
    gen = torch.Generator().manual_seed(3)
    shapes = [(48,), (3,), (700,), (16, 20)]
    params = [torch.randn(s, generator=gen) for s in shapes]
    states = [F.init_block_state(p, 4, torch.float32) for p in params]
    worst = 0.0
    for t in range(1, 801):
        norm = 10.0 ** (-6 + 12 * torch.rand((), generator=gen).item())
        damping = [1e-8, 1e-5, 1e-2, 1.0][t % 4]
        grads = [torch.randn(p.shape, generator=gen) for p in params]
        curvs = []
        for p, st in zip(params, states):
            c = torch.randn(p.numel(), generator=gen)
            if t % 3 == 1:
                c = st["U"].T @ torch.randn(st["U"].shape[0], generator=gen) + [1e-7, 1e-3, 3e-2][(t // 3) % 3] * c
            curvs.append((c * (norm / c.norm())).view(p.shape))
        fused.ginger(params, grads, curvs, [s["m"] for s in states], [s["U"] for s in states], [s["s"] for s in states],
                     [s["R"] for s in states], [t] * len(params), lr=1e-4, beta1=0.9, beta2=0.99, damping=damping, rho=1.0, weight_decay=0.0,
                     backend=backend)
        if t % 20 == 0 or t > 790:
            for st in states:
                assert all(torch.isfinite(st[k]).all() for k in ("m", "U", "s"))
                assert (st["s"] >= 0).all()
                worst = max(worst, orthonormality_error(st["U"]))
            assert worst <= 1e-4, (t, worst)


def test_kernel_is_built_and_used_where_a_compiler_exists():
    """The fast path must really be taken on CPU float32 when a C++ compiler is installed."""
    has_compiler = any(shutil.which(c) for c in ("g++", "c++", "clang++"))
    assert fused.kernel_available() == bool(has_compiler)
    p = torch.zeros(40)
    st = F.init_block_state(p, 4, torch.float32)
    assert fused._kernel_ok(fused._get_kernel(), p, p, p, st["m"], st["U"]) == bool(has_compiler)
    st64 = F.init_block_state(p.double(), 4, torch.float64)
    assert not fused._kernel_ok(fused._get_kernel(), p.double(), p.double(), None, st64["m"], st64["U"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_all_finite_matches_isfinite(dtype):
    x = torch.randn(1000).to(dtype)
    assert fused.all_finite(x).item() and fused.all_finite(torch.empty(0, dtype=dtype)).item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[517] = bad
        assert not fused.all_finite(y).item()


def test_rejects_unknown_backend():
    p = torch.zeros(3)
    st = F.init_block_state(p, 2, torch.float32)
    with pytest.raises(ValueError, match="backend"):
        fused.ginger([p], [p], [None], [st["m"]], [st["U"]], [st["s"]], [st["R"]], [1], **HP, backend="cuda-graph")
