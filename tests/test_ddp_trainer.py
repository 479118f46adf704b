"""The stock Trainer with ``--optim ginger`` under ``torchrun --nproc_per_node 2`` (CPU, gloo).

Both ranks must end with bit-identical parameters and Ginger state; in ``mc`` mode the optimizer
sums curvature with exactly one all-reduce per step, in ``empirical`` mode with none. The logged
curvature norm is that of the summed vector, and ``average_tokens_across_devices=False`` (which
makes the Trainer count only its own rank's labels) leaves the curvature unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from helpers import reference_curvature

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402
from test_ddp import launch  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "trainer_worker.py"
pytestmark = pytest.mark.slow
CAPTURE = ("--optim-args", "log_stats=true", "--dropout", "0", "--capture")


def norm(vectors: dict[str, torch.Tensor]) -> float:
    return sum(v.double().norm() ** 2 for v in vectors.values()).item() ** 0.5


def summed(ranks: list[dict], step: int) -> dict[str, torch.Tensor]:
    return {n: sum(r["curvature"][step][n] for r in ranks) for n in ranks[0]["curvature"][step]}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """Two ranks, mc curvature, log_stats, no dropout, every step's vectors captured (default Trainer settings)."""
    return launch(tmp_path_factory.mktemp("default"), *CAPTURE, worker=WORKER)


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


def test_logged_curvature_norm_is_the_norm_of_the_vector_summed_over_ranks(default_run):
    ranks = default_run
    assert ranks[0]["logged_norm"] == ranks[1]["logged_norm"] and len(ranks[0]["logged_norm"]) == 6
    for step, logged in enumerate(ranks[0]["logged_norm"]):
        assert logged == pytest.approx(norm(summed(ranks, step)), rel=1e-5)
        for r in ranks:  # a norm taken before the all-reduce would be one of these
            assert abs(norm(r["curvature"][step]) - logged) > 1e-3 * logged

    # ... which is the vector one process computes on the whole batch: both ranks' micro-batches, sampled labels.
    batches = [r["batches"][i] for r in ranks for i in range(2)]  # step 1: 2 micro-batches on each rank
    sampled = [r["sampled"][i] for r in ranks for i in range(2)]
    whole = reference_curvature(tiny.tiny_t5(seed=0, dropout=0.0), batches, sampled, scale="mean")
    assert ranks[0]["logged_norm"][0] == pytest.approx(norm(whole), rel=1e-5)


def test_average_tokens_across_devices_false_gives_the_same_curvature(default_run, tmp_path):
    """The Trainer's num_items_in_batch then counts one rank's labels; the curvature hook sums the counts."""
    local = launch(tmp_path, *CAPTURE, "--no-average-tokens", worker=WORKER)
    assert all(r["all_reduce_calls"] == [1] * 6 for r in local)  # the count's all-reduce runs in the forward pass
    assert tiny.bit_identical(local[0]["snapshot"], local[1]["snapshot"])
    for default, other in zip(default_run, local):
        assert torch.equal(default["sampled"][0], other["sampled"][0])  # same first step: same labels drawn
        # The first step sees the same parameters and labels; later steps differ because the Trainer's loss
        # (and so the gradient) is normalised per rank under this setting, which is the user's choice.
        for name, c in default["curvature"][0].items():
            torch.testing.assert_close(other["curvature"][0][name], c, rtol=1e-6, atol=1e-9)
    assert local[0]["logged_norm"][0] == pytest.approx(default_run[0]["logged_norm"][0], rel=1e-6)
