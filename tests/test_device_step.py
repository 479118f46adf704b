"""The device-resident step (``ginger_hf.device_step``): it runs on a fake CUDA device, never waits for the
device, and steps like the dense oracle on every device this machine has."""

import pytest
import torch
from dense_reference import DenseGinger
from helpers import relative_error
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ginger_hf import Ginger, device_step, symeig

# The devices the device path is checked on against the dense oracle: CPU, and CUDA where there is one
# (scripts/gpu_check.sh runs this file on a GPU).
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(6, 5), (7,), (3, 2, 4), (1,)]


class HostSyncs(TorchDispatchMode):
    """Records every op that makes the host wait for a device: a scalar read (``.item()``, ``bool()``,
    ``.tolist()``: ``aten._local_scalar_dense``) or a copy from a device to the host."""

    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.seen.append(str(func))
        out = func(*args, **kwargs)
        inputs = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        outputs = out if isinstance(out, (tuple, list)) else [out]
        if any(x.device.type != "cpu" for x in inputs) and any(
                isinstance(y, torch.Tensor) and y.device.type == "cpu" and y.dim() >= 0 for y in outputs):
            self.seen.append(f"device-to-host {func}")
        return out


def train_on_fake_cuda(backend, curvature, steps=3, blocks="row"):
    """Ginger on parameters of a fake CUDA device: a row-block group, a joint group and an AdamW group;
    refresh, keep, refresh. Returns the host syncs of every step (the first included)."""
    syncs = []
    with FakeTensorMode():
        params = [torch.nn.Parameter(torch.randn(s, device="cuda")) for s in SHAPES]
        half = torch.nn.Parameter(torch.randn(8, 3, device="cuda", dtype=torch.bfloat16))
        joint = [torch.nn.Parameter(torch.randn(4, 3, device="cuda")), torch.nn.Parameter(torch.randn(5, device="cuda"))]
        other = torch.nn.Parameter(torch.randn(3, 3, device="cuda"))
        opt = Ginger([{"params": params + [half]}, {"params": joint, "joint": True},
                      {"params": [other], "algorithm": "adamw"}], lr=1e-3, tau=2, blocks=blocks, backend=backend,
                     curvature=curvature, curvature_interval=2)
        everything = params + [half] + joint + [other]
        refreshes = []
        for _ in range(steps):
            refreshes.append(opt.needs_curvature())
            for p in everything:
                p.grad = torch.randn(p.shape, device="cuda", dtype=p.dtype)
                if curvature == "mc" and opt.needs_curvature():
                    p.curvature = torch.randn(p.shape, device="cuda", dtype=p.dtype)
            with HostSyncs() as seen:
                opt.step()
            syncs.append(seen.seen)
        state = opt.state[params[0]]
        assert all(state[key].device.type == "cuda" for key in ("m", "U", "s", "R", "e", "step", "skipped"))
        assert state["clock"] == steps
    assert refreshes == [True, False, True][:steps] or curvature == "empirical"
    return syncs


@pytest.mark.parametrize("backend,curvature,blocks", [(None, "empirical", "row"), (None, "mc", "tensor"),
                                                      ("torch", "empirical", "tensor"), ("torch", "mc", "row")])
def test_steps_on_a_fake_cuda_device_without_host_synchronisation(backend, curvature, blocks):
    """Under FakeTensorMode any read of a device value raises: this runs only if no step reads one. And no step,
    refresh or keep, the first one included, makes a scalar read or a device-to-host copy."""
    assert train_on_fake_cuda(backend, curvature, blocks=blocks) == [[]] * 3


def test_the_sync_counter_sees_what_it_should():
    """The dispatch mode above counts a ``.item()``-style read and a device-to-host copy (the test's own check)."""
    with FakeTensorMode():
        x = torch.randn(3, device="cuda")
        with HostSyncs() as seen:
            x.to("cpu")
        assert seen.seen and "device-to-host" in seen.seen[0]
    with HostSyncs() as seen:
        torch.ones(2).sum().item()
    assert seen.seen == ["aten._local_scalar_dense.default"]


def run_pair_on(device, hp, steps, interval, bad_step=None, shapes=SHAPES):
    """The device path (``backend="torch"``) on ``device``, the reference step (``backend="reference"``, CPU) and
    the dense oracle (float64, CPU), side by side.

    ``bad_step``: at that step, tensor 0's gradient and tensor 1's curvature vector hold a NaN (the dense
    oracle, which knows no skips, is then not stepped)."""
    gen = torch.Generator().manual_seed(3)
    inits = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    params = [torch.nn.Parameter(x.to(device)) for x in inits]
    refs = [torch.nn.Parameter(x.clone()) for x in inits]
    opt = Ginger(params, backend="torch", curvature="mc", curvature_interval=interval, **hp)
    ref = Ginger(refs, backend="reference", curvature="mc", curvature_interval=interval, **hp)
    dense = DenseGinger(shapes, curvature_interval=interval, **hp)
    thetas = [x.reshape(-1).clone() for x in inits]
    for t in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        curvs = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        if t == bad_step:
            grads[0].view(-1)[3] = float("nan")
            curvs[1].view(-1)[2] = float("nan")
        refresh = opt.needs_curvature()
        assert refresh == ref.needs_curvature()
        for ps, to in ((params, device), (refs, "cpu")):
            for p, g, c in zip(ps, grads, curvs):
                p.grad = g.to(to)
                if refresh:
                    p.curvature = c.to(to)
        if t != bad_step:
            thetas = dense.step(thetas, grads, curvs)
        opt.step()
        ref.step()
    return params, refs, thetas, opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lever", ["paper", "recommended"])
def test_device_path_matches_the_dense_oracle(device, lever):
    levers = {"paper": dict(blocks="tensor", power=1.0, damping=0.1, rho=1.0, relative_damping=0.0,
                            bias_correction=False),
              "recommended": dict(blocks="row", power=0.5, damping=1e-12, relative_damping=0.1, bias_correction=True,
                                  rho=None)}
    hp = dict(lr=0.05, betas=(0.9, 0.99), tau=3, weight_decay=0.0, **levers[lever])
    params, refs, thetas, _ = run_pair_on(device, hp, steps=12, interval=2)
    for p, r, theta in zip(params, refs, thetas):
        assert p.device.type == device
        assert relative_error(p.detach().cpu(), theta) <= 1e-11
        assert relative_error(p.detach().cpu(), r.detach()) <= 1e-11


@pytest.mark.parametrize("device", DEVICES)
def test_device_path_skips_non_finite_inputs_as_the_reference_does(device):
    """A NaN gradient (tensor 0) leaves that tensor as it was; a NaN curvature vector (tensor 1) costs only the
    refresh. Every tensor then matches the reference step, and the counters say what happened."""
    hp = dict(lr=0.05, betas=(0.9, 0.99), tau=2, weight_decay=0.0, blocks="row", power=0.5, damping=1e-12,
              relative_damping=0.1, bias_correction=True, rho=None)
    params, refs, _, opt = run_pair_on(device, hp, steps=6, interval=1, bad_step=4)
    first, second = opt.state[params[0]], opt.state[params[1]]
    assert int(first["skipped"]) == 1 and int(first["step"]) == 5
    assert int(second["curvature_skipped"]) == 1 and int(second["curvature_steps"]) == 5 and int(second["step"]) == 6
    for p, r in zip(params, refs):
        assert relative_error(p.detach().cpu(), r.detach()) <= 1e-11
    assert all(torch.isfinite(st[key]).all() for st in (first, second) for key in ("m", "U", "s", "R", "e"))


LEVERS = {"paper": dict(blocks="tensor", power=1.0, damping=0.1, rho=1.0, relative_damping=0.0,
                        bias_correction=False),
          "recommended": dict(blocks="row", power=0.5, damping=1e-12, relative_damping=0.1, bias_correction=True,
                              rho=None)}
PACKED_SHAPES = [(6, 5), (4, 5), (7,), (6, 5), (2, 5), (6, 5)]  # several tensors of one signature


@pytest.fixture
def packing_on_cpu(monkeypatch):
    """Small tensors pack off the CPU only; here they pack on CPU (where the results can be read), at most
    64 elements a pack, so that the shapes above make several packs (row blocks: three of two tensors and
    less; whole-tensor blocks: the two (6, 5) of the three). Returns the sizes (in tensors) of the packs
    whose passes ran."""
    monkeypatch.setattr(device_step, "_UNPACKED", set())
    monkeypatch.setattr(device_step, "_PACK_TOTAL", 64)
    seen = []
    packed = device_step._packed
    monkeypatch.setattr(device_step, "_packed", lambda vs, writes: seen.append(len(vs)) or packed(vs, writes))
    return seen


@pytest.mark.parametrize("lever", ["paper", "recommended"])
def test_packed_passes_match_the_dense_oracle(packing_on_cpu, lever):
    hp = dict(lr=0.05, betas=(0.9, 0.99), tau=3, weight_decay=0.1, **LEVERS[lever])
    params, refs, thetas, _ = run_pair_on("cpu", hp, steps=12, interval=2, shapes=PACKED_SHAPES)
    assert max(packing_on_cpu) > 1  # some tensors did take their passes together
    for p, r, theta in zip(params, refs, thetas):
        assert relative_error(p.detach(), theta) <= 1e-11
        assert relative_error(p.detach(), r.detach()) <= 1e-11


def test_a_packed_tensor_with_a_non_finite_gradient_is_left_as_it_was(packing_on_cpu):
    hp = dict(lr=0.05, betas=(0.9, 0.99), tau=2, weight_decay=0.0, **LEVERS["recommended"])
    params, refs, _, opt = run_pair_on("cpu", hp, steps=6, interval=1, bad_step=4, shapes=PACKED_SHAPES)
    assert max(packing_on_cpu) > 1
    assert int(opt.state[params[0]]["skipped"]) == 1 and int(opt.state[params[1]]["curvature_skipped"]) == 1
    for p, r in zip(params, refs):
        assert relative_error(p.detach(), r.detach()) <= 1e-11


def test_counters_round_trip_through_a_checkpoint_between_paths():
    """Device counters (tensors) load into the kernel path (ints) and back; the schedule's clock is a host int."""
    p = torch.nn.Parameter(torch.randn(4, 6))
    opt = Ginger([p], backend="torch", curvature="empirical", curvature_interval=3)
    for _ in range(4):
        p.grad = torch.randn(4, 6)
        opt.step()
    saved = opt.state_dict()
    assert isinstance(saved["state"][0]["step"], torch.Tensor) and saved["state"][0]["clock"] == 4
    q = torch.nn.Parameter(p.detach().clone())
    other = Ginger([q], backend="kernel", curvature="empirical", curvature_interval=3)
    other.load_state_dict(saved)
    assert other.needs_curvature() == opt.needs_curvature()
    q.grad = p.grad = torch.randn(4, 6)
    opt.step()
    other.step()
    assert other.state[q]["step"] == 5 and isinstance(other.state[q]["step"], int)
    assert relative_error(q.detach(), p.detach()) <= 2e-6


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 11])
@pytest.mark.parametrize("kind", ["random", "diagonal plus rank one", "tied", "pinned", "graded refresh"])
def test_jacobi_eigh_matches_lapack(size, kind):
    """``symeig.eigh`` (fixed sweeps, no host sync) against ``torch.linalg.eigh``, on the small problems a refresh
    meets: diagonal plus rank one with tiny components (deflation), all-equal eigenvalues (a fresh state), the
    in-span case whose residual slot is pinned at -1, and a refresh's ``K`` whose old eigenvalues span twelve
    decades (the slowest to converge of the families measured for ``symeig.sweeps``)."""
    gen = torch.Generator().manual_seed(size)
    N = 300
    z = torch.randn(N, size, generator=gen, dtype=torch.float64)
    if kind == "random":
        A = torch.randn(N, size, size, generator=gen, dtype=torch.float64)
        A = A + A.mT
    elif kind == "graded refresh":
        N = 20000
        s = torch.rand(N, size, generator=gen, dtype=torch.float64) * 10 ** (-12 * torch.rand(N, size, generator=gen))
        s[:, -1] = 0
        z = torch.randn(N, size, generator=gen, dtype=torch.float64) * 10 ** (4 * torch.rand(N, 1, generator=gen) - 2)
        A = torch.diag_embed(0.99 * s) + 0.01 * z[:, :, None] * z[:, None, :]
    else:
        d = torch.rand(N, size, generator=gen, dtype=torch.float64) * (kind != "tied")
        if kind == "pinned":
            d[:, -1], z[:, -1] = -1.0, 0.0
        z[:, :1] *= 1e-9 if size > 1 else 1
        A = torch.diag_embed(0.99 * d) + 0.01 * z[:, :, None] * z[:, None, :]
    lam, V = symeig.eigh(A)
    expected = torch.linalg.eigvalsh(A)
    scale = torch.linalg.matrix_norm(A, ord=2).clamp_min(1e-300)[:, None]
    assert ((lam - expected).abs() / scale).max() <= 1e-13
    assert (torch.linalg.matrix_norm(A @ V - V * lam[:, None, :]) / scale[:, 0]).max() <= 1e-12
    assert (V.mT @ V - torch.eye(size, dtype=torch.float64)).abs().max() <= 1e-13
