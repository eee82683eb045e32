"""dp combines the replicas' logged values without waiting for the GPU (issue 23, point 8): no tensor is
made from a Python number on the device, once per logged value per step."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gpupar.dp.replica_results import LogRecorder, replay_logs
from tests.helpers.markers import requires_cuda

PACKAGE = Path(__file__).resolve().parents[2] / "lightning_gpupar"


class Root:
    """Stands in for the root LightningModule: records what it logs."""

    def __init__(self) -> None:
        self.logged: dict[str, Any] = {}

    def log(self, name: str, value: Any, **kwargs: Any) -> None:
        self.logged[name] = value


def _recorders(device: torch.device) -> list[LogRecorder]:
    recorders = [LogRecorder(), LogRecorder()]
    for i, recorder in enumerate(recorders):
        recorder("loss", torch.tensor(1.0 + i, device=device))
        recorder("tokens", torch.tensor(10 * (i + 1), device=device), reduce_fx="sum")
        recorder("lr", 0.5 + i, reduce_fx="max")
        recorder("acc", 0.25 * (i + 1))
    return recorders


def _replay(recorders: list[LogRecorder], device: torch.device) -> dict[str, Any]:
    root = Root()
    replay_logs(root, recorders, [3, 1], [], device)  # type: ignore[arg-type]
    return root.logged


def test_logged_values_combine_by_weight_without_making_tensors_from_numbers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[str] = []
    for name in ("tensor", "as_tensor"):
        real = getattr(torch, name)

        def record(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            if Path(inspect.stack()[1].filename).resolve().is_relative_to(PACKAGE):
                made.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(torch, name, record)
    cpu = torch.device("cpu")
    recorders = _recorders(cpu)
    made.clear()
    logged = _replay(recorders, cpu)
    assert made == []
    assert float(logged["loss"]) == pytest.approx((3 * 1.0 + 1 * 2.0) / 4)  # weighted by shard size
    assert float(logged["tokens"]) == 30
    assert logged["lr"] == 1.5 and logged["acc"] == pytest.approx((3 * 0.25 + 0.5) / 4)


@pytest.mark.cuda
@requires_cuda
def test_logged_values_combine_on_a_gpu_without_a_host_sync() -> None:
    device = torch.device("cuda", 0)
    recorders = _recorders(device)  # (making the test's tensors copies from the host: before the check)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        logged = _replay(recorders, device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert float(logged["loss"]) == pytest.approx(1.25)
