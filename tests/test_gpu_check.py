"""scripts/gpu_check.sh --dry-run: the GPU check's steps, on CPU at tiny sizes (about a minute)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run_passes(tmp_path):
    env = dict(os.environ, PYTHON=sys.executable, GPU_CHECK_OUT=str(tmp_path), OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for step in ("tests", "count_launches.py", "bench_train.py", "symeig.eigh", "gpu_check done"):
        assert step in done.stdout, step
    assert "ginger" in done.stdout.split("bench_train.py, bf16")[1]
