"""GPU memory, utilisation and processes through NVML, mapped to this process's CUDA ids, touching no GPU."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lightning_gpupar.devices import query_inventory, resolve_devices
from tests.helpers.nvml_support import FakeNVML, GiB, cuda_contexts, fake_nvml, gpu

__all__ = ["cuda_contexts", "fake_nvml"]  # fixtures


def test_auto_reads_nvml_and_creates_no_cuda_context(fake_nvml: FakeNVML, cuda_contexts: list[int]) -> None:
    fake_nvml(gpu(0, 10), gpu(1, 40), gpu(2, 0.5), gpu(3, 30))
    assert resolve_devices("auto:2", "gpu").trainer_devices == [1, 3]
    inventory = query_inventory()
    assert inventory.source == "nvml"
    assert [g.free_bytes for g in inventory.gpus] == [10 * GiB, 40 * GiB, GiB // 2, 30 * GiB]
    assert [g.utilization_percent for g in inventory.gpus] == [0, 10, 20, 30]
    assert cuda_contexts == []  # not one GPU got a context, chosen or not


def test_processes_come_from_nvml(fake_nvml: FakeNVML) -> None:
    fake_nvml(gpu(0, 10, pids=[4242, 77]), gpu(1, 40))
    gpus = query_inventory().gpus
    assert gpus[0].processes == ("pid 4242 (1.0 GiB)", "pid 77 (1.0 GiB)")
    assert gpus[1].processes == ()


@pytest.mark.parametrize(
    ("visible", "order", "expected_uuids"),
    [
        ("2,0", None, ["GPU-02aa02", "GPU-00aa00"]),  # indices into CUDA's order
        ("GPU-03,GPU-01aa", None, ["GPU-03aa03", "GPU-01aa01"]),  # UUID prefixes
        ("1,7,2", None, ["GPU-01aa01"]),  # torch's rule: the list ends at the first id that does not exist
        ("3", "PCI_BUS_ID", ["GPU-03aa03"]),
    ],
)
def test_cuda_visible_devices_maps_cuda_ids_to_nvml_gpus(
    fake_nvml: FakeNVML,
    monkeypatch: pytest.MonkeyPatch,
    visible: str,
    order: str | None,
    expected_uuids: list[str],
) -> None:
    fake_nvml(gpu(0, 10), gpu(1, 40), gpu(2, 20), gpu(3, 30), visible=len(expected_uuids))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    if order:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", order)
    gpus = query_inventory().gpus
    assert [g.uuid for g in gpus] == expected_uuids
    assert [g.index for g in gpus] == list(range(len(expected_uuids)))


def test_mig_instances_named_in_cuda_visible_devices(
    fake_nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch
) -> None:
    mig = [{"uuid": f"MIG-m{i}", "total": 10 * GiB, "free": (i + 1) * GiB} for i in range(3)]
    fake_nvml(gpu(0, 10), gpu(1, 40, mig=mig), visible=2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "MIG-m2,MIG-m0")
    gpus = query_inventory().gpus
    assert [(g.uuid, g.free_bytes) for g in gpus] == [("MIG-m2", 3 * GiB), ("MIG-m0", GiB)]
    assert resolve_devices("auto:1", "gpu").trainer_devices == [0]


def test_mixed_models_follow_cuda_order_not_pci_order(
    fake_nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under FASTEST_FIRST, CUDA may count the faster model first: only CUDA knows, so torch is asked."""
    fake_nvml(gpu(0, 10, name="Fake T4"), gpu(1, 40, name="Fake H100"))
    cuda_uuids = {0: "01aa01", 1: "00aa00"}  # CUDA counts the H100 first
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=cuda_uuids[i]))
    assert [g.name for g in query_inventory().gpus] == ["Fake H100", "Fake T4"]
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # PCI order: NVML's own, torch is not asked
    monkeypatch.setattr(torch.cuda, "get_device_properties", _fail)
    assert [g.name for g in query_inventory().gpus] == ["Fake T4", "Fake H100"]


def test_without_nvml_falls_back_to_mem_get_info_and_says_so(
    fake_nvml: FakeNVML, cuda_contexts: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(gpu(0, 10), gpu(1, 40))
    monkeypatch.setenv("FAKE_NVML_FAIL", "1")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"t{i}"))
    inventory = query_inventory()
    assert inventory.source == "torch.cuda.mem_get_info"
    assert inventory.note is not None and "NVML could not start" in inventory.note
    assert cuda_contexts == [0, 1]  # the price of the fallback: a context on every GPU asked


def _fail(*args: Any) -> Any:
    raise AssertionError("torch was asked although NVML's order is CUDA's")


@pytest.mark.parametrize(
    "query",
    ["nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex", "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo"],
)
def test_any_nvml_error_falls_back_to_torch_and_says_why(
    query: str,
    fake_nvml: FakeNVML,
    cuda_contexts: list[int],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 23 point 7: NVML starts but a query fails (permissions, a lost GPU, a MIG parent):
    device_ids=auto and gpupar-devices answer from torch and name the error, not a raw NVMLError."""
    from lightning_gpupar.cli import devices as cli

    fake_nvml(gpu(0, 10), gpu(1, 40))
    monkeypatch.setenv("FAKE_NVML_ERROR_IN", query)
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(uuid=f"t{i}"))
    inventory = query_inventory()
    assert inventory.source == "torch.cuda.mem_get_info"
    assert inventory.note is not None and f"Insufficient Permissions ({query})" in inventory.note
    assert resolve_devices("auto:1", "gpu").trainer_devices == [0]  # mem_get_info's fake: GPU 0 first
    monkeypatch.setenv("COLUMNS", "300")
    assert cli.main([]) == 0
    assert f"Insufficient Permissions ({query})" in capsys.readouterr().out  # the source line says why
