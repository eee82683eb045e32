"""Deferred BatchNorm on CUDA streams: statistics committed after the pipeline's streams, no host sync.

Review points 1 and 2 of issue 23. The CPU tests decide the mechanism with recording fakes; the CUDA
tests decide it on one GPU (``[cuda:0, cuda:0]``: the compute stream is not the caller's stream).
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gpupar.model_split import batchnorm, plan_placement
from lightning_gpupar.model_split.pipeline import DeviceStreams, install_pipeline
from tests.helpers.markers import requires_cuda
from tests.model_split.test_deferred_batchnorm import PLACEMENT, ConvNet

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "lightning_gpupar"
CPU2 = [torch.device("cpu"), torch.device("cpu")]


def _pipelined(devices: list[torch.device], dtype: torch.dtype = torch.float64) -> ConvNet:
    model = ConvNet().to(dtype)
    plan = plan_placement(model, devices, PLACEMENT)
    for path, position in PLACEMENT.items():
        model.get_submodule(path).to(devices[position])
    install_pipeline(model, plan, list(PLACEMENT), chunks=4)
    return model


def test_statistics_are_committed_after_the_callers_streams_wait_for_the_pipeline(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Point 1: the caller's stream must wait for the compute streams (``DeviceStreams.end``) before the
    running statistics, computed on those streams, are read by the commit on the caller's stream."""
    events: list[str] = []
    end, commit = DeviceStreams.end, batchnorm._commit

    def recording_end(self: DeviceStreams) -> None:
        events.append("caller waits for the pipeline's streams")
        end(self)

    def recording_commit(*args: Any, **kwargs: Any) -> None:
        events.append("commit")
        commit(*args, **kwargs)

    monkeypatch.setattr(DeviceStreams, "end", recording_end)
    monkeypatch.setattr(batchnorm, "_commit", recording_commit)
    model = _pipelined(CPU2)
    model(torch.randn(8, 2, 5, 5, dtype=torch.float64)).sum().backward()
    assert events == ["caller waits for the pipeline's streams", "commit"]


def test_no_tensor_is_made_from_a_python_number_per_micro_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Point 2: ``torch.tensor(n, device=cuda)`` copies from the host and waits for the GPU; the package
    must not call it (nor ``as_tensor``) on the pipeline's per-micro-batch path."""
    made: list[str] = []
    for name in ("tensor", "as_tensor", "scalar_tensor"):
        real = getattr(torch, name)

        def record(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            caller = Path(inspect.stack()[1].filename).resolve()
            if caller.is_relative_to(PACKAGE):
                made.append(f"torch.{_name} in {caller.name}")
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, record)
    model = _pipelined(CPU2)
    for _ in range(2):
        model(torch.randn(8, 2, 5, 5, dtype=torch.float64)).sum().backward()
    assert made == []


@pytest.mark.cuda
@requires_cuda
def test_deferred_batchnorm_on_one_gpu_twice_makes_no_host_sync_and_matches_the_unsplit_model() -> None:
    """Points 1 and 2 on a GPU: [cuda:0, cuda:0], chunks=4; steps under ``set_sync_debug_mode("error")``
    (a host-blocking copy raises), running statistics equal the unsplit model's."""
    cuda = torch.device("cuda", 0)
    batches = [torch.randn(12, 2, 5, 5, dtype=torch.float64, device=cuda) * 3 + 1 for _ in range(3)]
    reference = ConvNet().to(cuda)
    model = _pipelined([cuda, cuda])
    for x in batches:
        reference(x).pow(2).mean().backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x in batches:
            model(x).pow(2).mean().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model.norm, name), getattr(reference.norm, name), msg=name)


# The sanitizer run of this pipeline (point 1): test_split_cuda_checks.py, model 'batchnorm'.
