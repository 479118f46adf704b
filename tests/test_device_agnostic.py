"""Device-agnostic step: no hard-coded device, and host synchronisations that do not grow with the model."""

import re
from collections import Counter
from pathlib import Path

import pytest
import torch

import ginger_hf
from ginger_hf import Ginger

PACKAGE = Path(ginger_hf.__file__).parent
# Every way a Python caller can pull a tensor's value to the host.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def count_host_syncs(fn) -> int:
    counts = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in SYNC_METHODS}

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counting(name, original))
    try:
        fn()
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
    return sum(counts.values())


def syncs_per_step(n_params: int, curvature: str, refresh: bool, backend: str, blocks: str) -> int:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8 + i, 5)) for i in range(n_params)]
    opt = Ginger(params, lr=1e-3, tau=3, curvature=curvature, curvature_interval=2, backend=backend, blocks=blocks)

    def feed():
        for p in params:
            p.grad = torch.randn(p.shape)
            if opt.needs_curvature():
                p.curvature = torch.randn(p.shape)

    feed()
    opt.step()  # step 1 refreshes, step 2 does not
    if not refresh:
        feed()
        return count_host_syncs(opt.step)
    feed()
    opt.step()
    feed()
    return count_host_syncs(opt.step)  # step 3 refreshes


@pytest.mark.parametrize("backend", ["kernel", "torch"])
@pytest.mark.parametrize("blocks", ["tensor", "row"])
@pytest.mark.parametrize("curvature", ["mc", "empirical"])
@pytest.mark.parametrize("refresh", [True, False])
def test_host_synchronisations_do_not_grow_with_the_number_of_parameters(backend, blocks, curvature, refresh):
    few = syncs_per_step(3, curvature, refresh, backend, blocks)
    many = syncs_per_step(30, curvature, refresh, backend, blocks)
    assert few == many, (few, many)


def test_numerical_modules_name_no_device():
    for name in ("functional.py", "fused.py", "solve.py", "optimizer.py", "curvature.py", "curvature_hook.py",
                 "device_step.py", "symeig.py", "state_schema.py", "step_plan.py"):
        source = (PACKAGE / name).read_text()
        # Tensors follow their parameter's device: nothing is created on or moved to a named device.
        assert not re.search(r"""(device=|\.to\(|torch\.device\()\s*["'](cuda|mps|xpu)""", source), name
        assert ".cuda(" not in source, name
