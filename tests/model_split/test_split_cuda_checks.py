"""model_split on real GPUs: the pipeline under torch's CUDA stream sanitizer with a slow producer stage,
checkpointing and bf16, memory stable over many steps; the free-memory check against ``mem_get_info``."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from lightning_gpupar.model_split import PlacementError, plan_placement
from tests.conftest import ROOT
from tests.helpers.markers import requires_cuda
from tests.helpers.programs import PROGRAMS

pytestmark = [pytest.mark.cuda, requires_cuda]

PROGRAM = PROGRAMS / "pipeline_sanitized_program.py"
STEPS = 30


@pytest.mark.slow
@pytest.mark.parametrize(
    ("devices", "model", "steps"),
    [
        (None, "transformer", STEPS),  # cuda:0 and cuda:1, or cuda:0 twice on one GPU
        ("cuda:0,cpu,cuda:0", "transformer", 12),  # GPU -> CPU -> GPU on one GPU
        ("cuda:0,cuda:0", "batchnorm", 12),  # deferred BatchNorm's commit (issue 23, point 1)
    ],
)
def test_pipeline_is_race_free_under_the_sanitizer_and_its_memory_is_stable(
    devices: str | None, model: str, steps: int
) -> None:
    env = {**os.environ, "TORCH_CUDA_SANITIZER": "1", "PYTHONPATH": str(ROOT)}
    args = [str(steps)] + ([devices, model] if devices else [])
    finished = subprocess.run(
        [sys.executable, str(PROGRAM), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-4000:]  # the sanitizer raises on a data race
    assert "data race" not in finished.stderr.lower()
    result = json.loads(finished.stdout.strip().splitlines()[-1])
    losses, allocated = result["losses"], result["allocated"]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    if model == "transformer":  # (BatchNorm normalises each micro-batch on its own statistics)
        assert losses[0] == pytest.approx(result["ref_loss"], rel=5e-2)  # bf16: the unsplit model's loss
    assert losses[-1] < losses[0]
    assert allocated[-1] == allocated[5]  # nothing accumulates once the optimizer state exists


def test_check_free_memory_reads_the_real_free_memory() -> None:
    device = torch.device("cuda", 0)
    free, _ = torch.cuda.mem_get_info(device)
    with torch.device("meta"):  # sizes only: nothing is allocated
        fits = nn.Sequential(nn.Linear(1024, 1024))
        too_big = nn.Sequential(nn.Linear(1024, free // 4096 + 1024))  # > free bytes in float32
    plan_placement(fits, [device], {"0": 0}).check_free_memory()
    with pytest.raises(PlacementError, match=r"does not fit: cuda:0 needs .* but has .* free"):
        plan_placement(too_big, [device], {"0": 0}).check_free_memory()
