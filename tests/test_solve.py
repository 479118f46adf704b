"""The small refresh problem: the C++ solve (CPU) against the torch solve (GPU and fallback), block by block."""

import pytest
import torch

from ginger_hf import kernel, solve
from ginger_hf.functional import Hyper

pytestmark = pytest.mark.skipif(not kernel.available(), reason="needs the C++ kernel (no compiler found)")


def random_blocks(N, n, k, seed, *, in_span=0.0, far_from_orthonormal=False):
    """Pass-1 sums of random blocks: basis rows, curvature and momentum vectors, and their small state."""
    gen = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(N, k, n, generator=gen, dtype=torch.float64))[0].mT
    if far_from_orthonormal:
        U = U * (1 + 0.3 * torch.rand(N, n, 1, generator=gen, dtype=torch.float64))
    c = torch.randn(N, k, generator=gen, dtype=torch.float64)
    if in_span:
        inside = (U.mT @ torch.randn(N, n, 1, generator=gen, dtype=torch.float64))[..., 0]
        c = inside + in_span * inside.norm(dim=1, keepdim=True) * c / c.norm(dim=1, keepdim=True)
    m = torch.randn(N, k, generator=gen, dtype=torch.float64)
    layout = solve.StatsLayout(n)
    S = torch.zeros(N, layout.width, dtype=torch.float64)
    layout.view(S, "gram").copy_(U @ U.mT)
    layout.view(S, "uc").copy_((U @ c[..., None])[..., 0])
    layout.view(S, "um").copy_((U @ m[..., None])[..., 0])
    for name, value in (("cc", c * c), ("cm", c * m), ("mm", m * m), ("gg", m * m)):
        layout.view(S, name).copy_(value.sum(-1))
    Q = torch.linalg.qr(torch.randn(N, n, n, generator=gen, dtype=torch.float64))[0]

    # every per-block parameter as the step computes it (solve.solve_params), the bias corrections set apart
    hyper = Hyper(lr=0.1, beta2=0.95, damping=1e-3, relative_damping=0.1, power=0.5, bias_correction=True)
    params = dict(zip(solve.SOLVE_PARAMS, solve.solve_params(hyper, 3, 2, 0.9, k, torch.float64)))
    params.update(debias=0.6, debias_e=0.7, momentum_debias=0.5)
    blocks = solve.Blocks(
        s=torch.rand(N, n, generator=gen, dtype=torch.float64).sort(-1).values, R=Q,
        e=torch.rand(N, generator=gen, dtype=torch.float64),
        **{name: torch.full((N,), value, dtype=torch.float64) for name, value in params.items()})
    return blocks, layout, S


@pytest.mark.parametrize("n", [1, 4, 10, 32])
@pytest.mark.parametrize("case", ["random", "in-span", "nearly-in-span", "zero", "not-orthonormal"])
def test_cpp_solve_matches_torch_solve(n, case):
    k = n + 7
    blocks, layout, S = random_blocks(64, n, k, seed=n, in_span={"in-span": 1e-12, "nearly-in-span": 1e-4}.get(case, 0.0),
                                      far_from_orthonormal=case == "not-orthonormal")
    if case == "zero":
        for name in ("uc", "cc", "cm"):
            layout.view(S, name).zero_()
    ref = solve.solve_refresh(blocks, layout, S)
    out = kernel.solve_refresh(blocks, layout, solve.CoefLayout(n), S)
    assert torch.equal(out["rotate"], ref["rotate"])
    assert bool(ref["rotate"].any()) == (case not in ("in-span", "zero"))
    # near the span the reflection's coefficients scale like 1/r: rounding differences grow like eps/r^2
    tol = 1e-7 if case == "nearly-in-span" else 1e-10
    for name in ("s", "e", "shrink", "shift", "v_u", "v_c", "along", "scale", "update_sq", "span_sq"):
        scale = ref[name].abs().max().clamp_min(1e-300)
        assert (out[name] - ref[name]).abs().max() <= tol * scale, name
    # R is determined up to rotations within equal eigenvalues: compare the models R^T diag(s) R
    model = lambda o: o["R"].mT @ (o["s"][..., None] * o["R"])  # noqa: E731
    assert (model(out) - model(ref)).abs().max() <= 1e-10 * model(ref).abs().max()


@pytest.mark.parametrize("n", [1, 4, 10])
def test_cpp_keep_solve_matches_torch_keep_solve(n):
    blocks, layout, S = random_blocks(64, n, n + 7, seed=n)
    ref = solve.solve_keep(blocks, layout, S)
    out = kernel.solve_keep(blocks, layout, solve.CoefLayout(n), S)
    for name in ("shrink", "scale", "update_sq", "span_sq", "e"):
        assert (out[name] - ref[name]).abs().max() <= 1e-12 * ref[name].abs().max().clamp_min(1e-300), name


def rank_one_problem(case, m, gen):
    """``(d, z)`` of ``diag(d) + rho z z^T``: the refresh's eigenproblem (``d = beta2 s`` and 0 for the residual)."""
    d = torch.rand(m, generator=gen, dtype=torch.float64)
    z = torch.randn(m, generator=gen, dtype=torch.float64)
    if case == "z_i = 0":
        z[::2] = 0
    elif case == "repeated s":
        d[m // 2 :] = d[0]
    elif case == "s = 0 (the first refresh)":
        d.zero_()
    elif case == "close s":
        d = d.sort().values
        d[1::2] = d[::2][: m // 2] + 1e-14
    elif case == "z = 0":
        z.zero_()
    elif case == "tiny":
        d, z = d * 1e-30, z * 1e-15
    elif case == "huge":
        d, z = d * 1e30, z * 1e15
    return d, z


@pytest.mark.parametrize("m", [1, 2, 5, 11, 33, 65])
@pytest.mark.parametrize("case", ["random", "z_i = 0", "repeated s", "s = 0 (the first refresh)", "close s", "z = 0",
                                  "tiny", "huge"])
def test_rank_one_eigh_matches_dense_eigh(case, m):
    """The closed-form eigensolver of the refresh against ``torch.linalg.eigh`` in float64: the same eigenvalues,
    eigenvectors with a residual and an orthogonality at rounding level (where eigenvalues repeat, any basis of
    their space is right, so the vectors are not compared one by one)."""
    d, z = rank_one_problem(case, m, torch.Generator().manual_seed(m))
    rho = 0.05
    K = torch.diag(d) + rho * torch.outer(z, z)
    lam, V = kernel.rank_one_eigh(d, z, rho)
    ref = torch.linalg.eigh(K).eigenvalues
    norm = K.abs().max().clamp_min(1e-300)
    eps = torch.finfo(torch.float64).eps
    assert (lam - ref).abs().max() <= 8 * m * eps * norm
    assert bool((lam[1:] >= lam[:-1]).all())
    assert (K @ V - V * lam).abs().max() <= 8 * m * eps * norm
    assert (V.T @ V - torch.eye(m, dtype=torch.float64)).abs().max() <= 8 * m * eps


def test_rank_one_eigh_rejects_bad_sizes():
    with pytest.raises(ValueError, match="size must be"):
        kernel.rank_one_eigh(torch.zeros(66), torch.zeros(66), 0.1)
    with pytest.raises(ValueError, match="rho >= 0"):
        kernel.rank_one_eigh(torch.zeros(3), torch.zeros(3), -1.0)


def test_kernel_with_another_interface_version_is_refused(monkeypatch):
    """A library whose compiled interface version is not the package's is refused, naming the file."""
    from ginger_hf import kernel_interface

    class Stale:
        def ginger_abi_version(self):
            return kernel_interface.ABI_VERSION - 1

    monkeypatch.setattr(kernel.ctypes, "CDLL", lambda path: Stale())
    with pytest.raises(RuntimeError, match=r"ginger_cpu_\w+\.so has interface version .* delete the file"):
        kernel._build()


def test_interface_header_names_every_field():
    """The generated C++ header holds each record's fields by name, in the Python order, and the rank limit."""
    from ginger_hf import kernel_interface

    header = kernel_interface.cpp_header()
    for record, fields in kernel_interface.RECORDS.items():
        assert f"namespace {record} {{ enum : int {{ {', '.join(fields)}, count }}; }}" in header
    assert f"constexpr int kMaxRank = {kernel_interface.MAX_RANK};" in header
    assert kernel_interface.RECORDS["Param"][: len(solve.SOLVE_PARAMS)] == solve.SOLVE_PARAMS


@pytest.mark.parametrize("bias_correction", [False, True])
def test_counter_params_agree_between_host_numbers_and_device_columns(bias_correction):
    """``solve.counter_params`` on per-tensor columns (the device path) gives ``solve_params``' numbers (the kernel
    path), refreshes or not, first step included."""
    hypers = [Hyper(lr=0.1, beta2=b2, damping=1e-3, bias_correction=bias_correction) for b2 in (0.9, 0.99, 0.999)]
    counters = [(1, 0), (5, 0), (7, 3)]
    x = {name: torch.tensor([solve.tensor_params(h, 10, torch.float32)[name] for h in hypers], dtype=torch.float64)
         for name in solve.tensor_params(hypers[0], 10, torch.float32)}
    t, q = (torch.tensor(c, dtype=torch.float64) for c in zip(*counters))
    columns = {**x, **solve.counter_params(x, t, q, 0.9)}
    for i, (h, (ti, qi)) in enumerate(zip(hypers, counters)):
        expected = solve.solve_params(h, ti, qi, 0.9, 10, torch.float32)
        assert [float(columns[name][i]) for name in solve.SOLVE_PARAMS] == pytest.approx(expected, rel=1e-12)
