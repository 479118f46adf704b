"""Distributed data parallel: 2 CPU processes (torchrun, gloo) running a plain Accelerate loop.

Each launch trains a tiny T5 for 8 steps in tests/dist/ddp_worker.py and saves parameters,
Ginger state and the number of ``all_reduce`` calls made inside every ``optimizer.step()``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "dist"))
import tiny  # noqa: E402

WORKER = Path(__file__).parent / "dist" / "ddp_worker.py"
pytestmark = pytest.mark.slow


def launch(out: Path, *args: str, nproc: int = 2, worker: Path = WORKER) -> list[dict]:
    """Run ``worker`` on ``nproc`` processes (torchrun) or one plain process (``nproc=0``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(tiny.free_port())]
    else:
        cmd = [sys.executable]
    proc = subprocess.run([*cmd, str(worker), "--out", str(out), *args], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(max(nproc, 1))]


def max_rel(a: dict, b: dict, prefix: str) -> float:
    keys = [k for k in a if k.startswith(prefix) and isinstance(a[k], torch.Tensor)]
    assert keys
    assert all(a[k] == b[k] for k in a if k.startswith(prefix) and k not in keys)  # step counts
    return max(((a[k] - b[k]).norm() / b[k].norm().clamp_min(1e-30)).item() for k in keys)


def test_mc_two_ranks_equal_one_process_accumulating_their_batches(tmp_path):
    """The curvature is summed over ranks like micro-batches: 2 ranks x batch 4 == 1 process x 2 micro-batches of 4.

    Sampled labels are fixed per (step, rank / micro-batch) so both runs draw the same ones.
    """
    ranks = launch(tmp_path / "ddp", "--curvature", "mc", "--generator-seed", "7")
    (single,) = launch(tmp_path / "one", "--curvature", "mc", "--generator-seed", "7", "--accum", "2", nproc=0)
    assert ranks[0]["synced"] and ranks[0]["world"] == 2 and not single["synced"]
    assert tiny.bit_identical(ranks[0]["snapshot"], ranks[1]["snapshot"])
    assert ranks[0]["all_reduce_calls"] == [1] * 8  # one flattened all-reduce per refresh
    assert single["all_reduce_calls"] == [0] * 8
    initial = {"param/" + n: p.detach() for n, p in tiny.tiny_t5(seed=0, dropout=0.0).named_parameters()}
    assert max_rel(ranks[0]["snapshot"], initial, "param/") > 1e-3  # the parameters did train
    assert max_rel(ranks[0]["snapshot"], single["snapshot"], "param/") <= 1e-4
    assert max_rel(ranks[0]["snapshot"], single["snapshot"], "state/") <= 1e-4


def test_empirical_two_ranks_batch4_match_one_process_batch8(tmp_path):
    ranks = launch(tmp_path / "ddp", "--curvature", "empirical")
    (single,) = launch(tmp_path / "one", "--curvature", "empirical", "--batch", "8", nproc=0)
    assert tiny.bit_identical(ranks[0]["snapshot"], ranks[1]["snapshot"])
    assert ranks[0]["all_reduce_calls"] == [0] * 8  # c = the gradient, already reduced by DDP
    assert max_rel(ranks[0]["snapshot"], single["snapshot"], "param/") <= 1e-4
    m = {k: v for k, v in ranks[0]["snapshot"].items() if k.endswith("/m")}
    assert max_rel(m, single["snapshot"], "state/") <= 1e-4


def test_mc_interval_communicates_only_on_refresh_steps(tmp_path):
    """curvature_interval=2, dropout on, labels sampled from the global RNG: still identical ranks."""
    ranks = launch(tmp_path / "ddp", "--curvature", "mc", "--interval", "2", "--dropout", "0.1")
    assert ranks[0]["refresh"] == [True, False] * 4
    assert ranks[0]["all_reduce_calls"] == [1, 0] * 4
    assert tiny.bit_identical(ranks[0]["snapshot"], ranks[1]["snapshot"])
    assert ranks[0]["warnings"] == []


def test_independent_processes_keep_their_own_curvature(tmp_path):
    """Without a DDP-wrapped model Ginger does not communicate; it warns once that it could."""
    ranks = launch(tmp_path / "solo", "--curvature", "mc", "--no-ddp")
    for r in ranks:
        assert not r["synced"]
        assert r["all_reduce_calls"] == [0] * 8
        assert len(r["warnings"]) == 1 and "sync_curvature" in r["warnings"][0]
    assert max_rel(ranks[0]["snapshot"], ranks[1]["snapshot"], "param/") > 1e-3  # different data, not averaged

