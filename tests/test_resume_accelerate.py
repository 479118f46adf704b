"""Exact resume in a plain Accelerate loop: ``accelerator.save_state`` / ``load_state``.

12 optimizer steps of 2 micro-batches, ``curvature="mc"`` with labels sampled from the global
torch RNG (which accelerate checkpoints) and dropout on, equal a run saved after step 6 and
continued from the checkpoint by a freshly built model / optimizer / accelerator.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402

import ginger_hf  # noqa: E402

accelerate = pytest.importorskip("accelerate")
from accelerate import Accelerator  # noqa: E402
from accelerate.state import AcceleratorState, GradientState  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

ACCUM, BATCH = 2, 4


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def build(model_seed: int):
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(cpu=True)
    model = tiny.tiny_t5(seed=model_seed, dropout=0.1)
    optimizer = ginger_hf.Ginger(model.parameters(), lr=3e-3, tau=2, curvature="mc")
    loader = torch.utils.data.DataLoader(tiny.make_data(12 * ACCUM * BATCH, seed=3), batch_size=BATCH,
                                         collate_fn=tiny.collate, shuffle=True,
                                         generator=torch.Generator().manual_seed(5))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    return accelerator, model, optimizer, loader


def test_save_state_load_state_resumes_exactly(tmp_path):
    set_seed(0)
    accelerator, model, optimizer, loader = build(model_seed=0)
    batches = iter(loader)
    tiny.train_steps(accelerator, model, optimizer, batches, 6, accum=ACCUM)
    accelerator.save_state(str(tmp_path / "step6"))
    at_save = tiny.snapshot(model, optimizer)
    tiny.train_steps(accelerator, model, optimizer, batches, 6, accum=ACCUM)
    straight = tiny.snapshot(model, optimizer)

    def resumed(restore_rng: bool):
        set_seed(123)  # a different process: other RNG, other initial weights
        accelerator, model, optimizer, loader = build(model_seed=1)
        rng = torch.get_rng_state()
        accelerator.load_state(str(tmp_path / "step6"))
        if not restore_rng:
            torch.set_rng_state(rng)
        assert tiny.bit_identical(tiny.snapshot(model, optimizer), at_save)
        batches = iter(accelerator.skip_first_batches(loader, 6 * ACCUM))
        tiny.train_steps(accelerator, model, optimizer, batches, 6, accum=ACCUM)
        return tiny.snapshot(model, optimizer)

    assert tiny.max_abs_diff(resumed(restore_rng=True), straight) <= 1e-6
    # The check is sensitive to the RNG: without the checkpointed RNG, dropout and sampled labels differ.
    assert tiny.max_abs_diff(resumed(restore_rng=False), straight) > 1e-4
    assert ginger_hf.unwrap_ginger(optimizer).state[next(model.parameters())]["step"] == 12
