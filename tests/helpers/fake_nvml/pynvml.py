"""A fake ``pynvml`` (nvidia-ml-py) for tests: GPUs from ``$FAKE_NVML_GPUS`` (JSON), read on each call.

Put this directory first on ``sys.path`` / ``PYTHONPATH`` (or into ``sys.modules["pynvml"]``). Each GPU is
``{"uuid": "GPU-...", "name": "...", "total": bytes, "free": bytes, "util": percent, "pids": [...],
"mig": [{"uuid": "MIG-...", "total": ..., "free": ...}]}``, listed in PCI bus order. ``FAKE_NVML_FAIL=1``
makes ``nvmlInit`` fail as it does without a driver; ``FAKE_NVML_ERROR_IN=nvmlDeviceGetUUID,...``
makes those queries raise ``NVMLError`` (no permission, a lost GPU, a MIG parent). Every handle a caller
asks for is recorded in ``$FAKE_NVML_LOG`` when set (one UUID a line): tests see which GPUs were asked.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any

NVML_DEVICE_MIG_ENABLE = 1


class NVMLError(Exception):
    pass


def _gpus() -> list[dict[str, Any]]:
    return list(json.loads(os.environ.get("FAKE_NVML_GPUS", "[]")))


def nvmlInit() -> None:
    if os.environ.get("FAKE_NVML_FAIL"):
        raise NVMLError("Driver Not Loaded")


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    _maybe_fail("nvmlDeviceGetCount")
    return len(_gpus())


def nvmlDeviceGetHandleByIndex(index: int) -> dict[str, Any]:
    _maybe_fail("nvmlDeviceGetHandleByIndex")
    return _gpus()[index]


def nvmlDeviceGetUUID(handle: dict[str, Any]) -> str:
    _maybe_fail("nvmlDeviceGetUUID")
    return str(handle["uuid"])


def nvmlDeviceGetName(handle: dict[str, Any]) -> str:
    _maybe_fail("nvmlDeviceGetName")
    return str(handle.get("name", "Fake GPU"))


def nvmlDeviceGetMemoryInfo(handle: dict[str, Any]) -> SimpleNamespace:
    _maybe_fail("nvmlDeviceGetMemoryInfo")
    _record(handle)
    return SimpleNamespace(total=handle["total"], free=handle["free"], used=handle["total"] - handle["free"])


def nvmlDeviceGetUtilizationRates(handle: dict[str, Any]) -> SimpleNamespace:
    if "util" not in handle:
        raise NVMLError("Not Supported")
    return SimpleNamespace(gpu=handle["util"], memory=0)


def nvmlDeviceGetComputeRunningProcesses(handle: dict[str, Any]) -> list[SimpleNamespace]:
    return [SimpleNamespace(pid=pid, usedGpuMemory=2**30) for pid in handle.get("pids", [])]


def nvmlDeviceGetMigMode(handle: dict[str, Any]) -> tuple[int, int]:
    mode = NVML_DEVICE_MIG_ENABLE if handle.get("mig") else 0
    return mode, mode


def nvmlDeviceGetMaxMigDeviceCount(handle: dict[str, Any]) -> int:
    return len(handle.get("mig", []))


def nvmlDeviceGetMigDeviceHandleByIndex(handle: dict[str, Any], index: int) -> dict[str, Any]:
    return {"name": f"{handle.get('name', 'Fake GPU')} MIG", **handle["mig"][index]}


def _maybe_fail(query: str) -> None:
    if query in os.environ.get("FAKE_NVML_ERROR_IN", "").split(","):
        raise NVMLError(f"Insufficient Permissions ({query})")


def _record(handle: dict[str, Any]) -> None:
    log = os.environ.get("FAKE_NVML_LOG")
    if log:
        with open(log, "a") as file:
            file.write(f"{handle['uuid']}\n")
