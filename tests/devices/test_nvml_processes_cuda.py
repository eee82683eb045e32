"""On real GPUs, NVML's process lists show that choosing with ``auto`` creates no CUDA context, and that
a run on cuda:1 leaves cuda:0 untouched (skipped without CUDA and nvidia-ml-py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT
from tests.helpers.markers import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda, pytest.mark.slow]

PROGRAM = Path(__file__).resolve().parent / "nvml_processes_program.py"


def _run(*args: str) -> dict[str, object]:
    pytest.importorskip("pynvml")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, str(PROGRAM), *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def test_choosing_with_auto_puts_this_process_on_no_gpu() -> None:
    assert _run()["after_auto"] == []


def test_a_run_on_cuda_1_never_appears_on_cuda_0() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    result = _run("1")
    if not result["any_listed"]:
        pytest.skip("NVML lists no processes here (a container's own pid namespace)")
    assert result["after_auto"] == []
    assert result["after_training"] == [1]
