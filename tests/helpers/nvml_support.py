"""A fake NVML for device tests: GPUs described as dicts, served by ``fake_nvml/pynvml.py``."""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.fabric.accelerators.cuda
import lightning.pytorch.accelerators.cuda
import pytest
import torch

from lightning_gpupar.devices import locks as device_locks
from lightning_gpupar.devices import requests as devices
from lightning_gpupar.devices.locks import LOCK_DIR_ENV

FAKE_NVML_DIR = Path(__file__).resolve().parent / "fake_nvml"
GiB = 2**30


def gpu(n: int, free_gib: float, name: str = "Fake H100", **extra: Any) -> dict[str, Any]:
    """Physical GPU ``n`` (PCI order) with ``free_gib`` free of 80 GiB."""
    return {
        "uuid": f"GPU-{n:02d}aa{n:02d}",
        "name": name,
        "total": 80 * GiB,
        "free": int(free_gib * GiB),
        "util": 10 * n,
        **extra,
    }


FakeNVML = Callable[..., list[dict[str, Any]]]


@pytest.fixture
def fake_nvml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeNVML]:
    """``fake_nvml(gpu(0, 10), gpu(1, 40), visible=2)``: NVML knows these GPUs, this process sees ``visible``
    of them (default: all), gpupar's GPU locks live under ``tmp_path``."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "pynvml", module)
    monkeypatch.setenv(LOCK_DIR_ENV, str(tmp_path / "locks"))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)

    def install(*gpus: dict[str, Any], visible: int | None = None) -> list[dict[str, Any]]:
        count = len(gpus) if visible is None else visible
        monkeypatch.setenv("FAKE_NVML_GPUS", json.dumps(list(gpus)))
        monkeypatch.setattr(devices, "cuda_device_count", lambda: count)
        monkeypatch.setattr(lightning.fabric.accelerators.cuda, "num_cuda_devices", lambda: count)
        monkeypatch.setattr(lightning.pytorch.accelerators.cuda, "num_cuda_devices", lambda: count)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
        return list(gpus)

    yield install
    device_locks.release(device_locks.held_here())


@pytest.fixture
def cuda_contexts(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The CUDA ids that got a CUDA context, in order: torch's calls that create one are recorded instead
    (``set_device``, ``mem_get_info``, ``synchronize``, entering ``torch.cuda.device``); queries that create
    none (capability, name) answer for an H100."""
    touched: list[int] = []

    def index(device: Any = None) -> int:
        if device is None:
            return 0  # torch's current device, 0 unless set
        return device if isinstance(device, int) else int(torch.device(device).index or 0)

    class RecordingDevice:
        def __init__(self, device: Any) -> None:
            self.index = index(device)

        def __enter__(self) -> None:
            touched.append(self.index)

        def __exit__(self, *exc: object) -> None:
            pass

    def mem_get_info(device: Any = None) -> tuple[int, int]:
        touched.append(index(device))
        return 40 * GiB, 80 * GiB

    monkeypatch.setattr(torch.cuda, "set_device", lambda d: touched.append(index(d)))
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda d=None: touched.append(index(d)))
    monkeypatch.setattr(torch.cuda, "device", RecordingDevice)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Fake H100")
    return touched
