"""``make gpu-check`` on a machine without GPUs: it says so plainly and fails."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_without_a_gpu_it_says_so_and_exits_non_zero() -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(ROOT)}
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "found no CUDA GPU" in done.stdout and "nothing to check" in done.stdout
    assert "Traceback" not in done.stderr


def test_make_gpu_check_runs_the_script() -> None:
    # --no-print-directory: under `make test` this make is a sub-make, which would add "Leaving directory"
    done = subprocess.run(
        ["make", "-n", "--no-print-directory", "gpu-check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "benchmarks/gpu_check.py" in done.stdout.splitlines()[-1]
