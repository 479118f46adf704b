"""The stock Trainer with ``--optim ginger`` under ``torchrun --nproc_per_node 2`` (CPU, gloo).

Both ranks must end with bit-identical parameters and Ginger state; in ``mc`` mode the optimizer
sums curvature with exactly one all-reduce per step, in ``empirical`` mode with none.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402
from test_ddp import launch  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "trainer_worker.py"
pytestmark = pytest.mark.slow


@pytest.mark.parametrize("curvature,calls", [("mc", 1), ("empirical", 0)])
def test_trainer_ddp_ranks_hold_identical_state(tmp_path, curvature, calls):
    ranks = launch(tmp_path, "--curvature", curvature, worker=WORKER)
    for r in ranks:
        assert r["world"] == 2 and r["ddp"]
        assert r["synced"]
        assert r["all_reduce_calls"] == [calls] * 6
    assert ranks[0]["snapshot"].keys() == ranks[1]["snapshot"].keys()
    assert any(k.endswith("/U") for k in ranks[0]["snapshot"])
    assert tiny.bit_identical(ranks[0]["snapshot"], ranks[1]["snapshot"])
