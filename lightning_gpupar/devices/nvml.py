"""What each visible GPU holds (memory, utilisation, processes), read without touching the GPUs.

How it works: docs/internals.md, section ``lightning_gpupar/devices/nvml.py``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from lightning_gpupar.devices.sizes import format_bytes
from lightning_gpupar.errors import GpuparError

#: Where the numbers came from.
Source = Literal["nvml", "torch.cuda.mem_get_info"]


@dataclass(frozen=True)
class GPUInfo:
    """One CUDA device as this process sees it (``index`` is its CUDA id in this process)."""

    index: int
    name: str
    total_bytes: int
    free_bytes: int
    utilization_percent: int | None = None
    processes: tuple[str, ...] | None = None
    uuid: str | None = None


@dataclass(frozen=True)
class GPUInventory:
    """The visible GPUs, the source of their numbers, and why NVML was not used (when it was not)."""

    gpus: tuple[GPUInfo, ...]
    source: Source
    note: str | None = None


class NVMLUnavailable(GpuparError, RuntimeError):
    """NVML cannot answer for this process's GPUs; the message says why."""


def load_nvml() -> Any:
    """The initialised ``pynvml`` module, or :class:`NVMLUnavailable` saying why not."""
    try:
        import pynvml
    except ImportError:
        raise NVMLUnavailable(
            "nvidia-ml-py is not installed (pip install 'lightning-gpupar[nvml]')"
        ) from None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        raise NVMLUnavailable(f"NVML could not start ({err})") from None
    return pynvml


def read_gpus(count: int) -> GPUInventory:
    """Memory, utilisation and processes of CUDA devices ``0..count-1``: NVML first, else torch."""
    if count == 0:
        return GPUInventory((), "nvml")
    try:
        nvml = load_nvml()
        try:
            return GPUInventory(
                tuple(_nvml_info(nvml, i, h) for i, h in enumerate(cuda_handles(nvml, count))), "nvml"
            )
        except nvml.NVMLError as err:  # a query NVML refused: no permission, a lost GPU, a MIG parent
            raise NVMLUnavailable(f"NVML failed to answer ({type(err).__name__}: {err})") from None
    except NVMLUnavailable as err:
        note = str(err)
    infos = []
    for index in range(count):
        free, total = torch.cuda.mem_get_info(index)
        uuid = f"GPU-{torch.cuda.get_device_properties(index).uuid}"
        infos.append(GPUInfo(index, torch.cuda.get_device_name(index), total, free, uuid=uuid))
    return GPUInventory(tuple(infos), "torch.cuda.mem_get_info", note)


def cuda_handles(nvml: Any, count: int) -> list[Any]:
    """NVML handles of CUDA devices ``0..count-1`` as this process numbers them (module docstring)."""
    physical = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
    visible = torch.cuda._parse_visible_devices()
    if visible and isinstance(visible[0], str) and visible[0].startswith("MIG-"):
        handles = _mig_handles(nvml, physical, [str(v) for v in visible])
    elif torch.cuda.is_initialized() or not _counts_in_pci_order(nvml, physical):
        # CUDA already numbered the GPUs (its order may predate a later CUDA_DEVICE_ORDER change), or
        # mixed models under FASTEST_FIRST, where only CUDA knows its order: ask torch for each id's UUID
        by_uuid = {_uuid(nvml, h): h for h in physical}
        uuids = [f"GPU-{torch.cuda.get_device_properties(i).uuid}" for i in range(count)]
        handles = [by_uuid[u] for u in uuids if u in by_uuid]
    elif visible and isinstance(visible[0], str):
        uuids = [_uuid(nvml, h) for h in physical]
        handles = [
            physical[i] for i in torch.cuda._transform_uuid_to_ordinals([str(v) for v in visible], uuids)
        ]
    else:
        handles = []
        for i in visible:  # torch's rule: the list ends at the first id that does not exist
            if not 0 <= int(i) < len(physical):
                break
            handles.append(physical[int(i)])
    if len(handles) < count:
        raise NVMLUnavailable(
            f"NVML maps {len(handles)} of this process's {count} CUDA devices "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})"
        )
    return handles[:count]


def _counts_in_pci_order(nvml: Any, physical: Sequence[Any]) -> bool:
    """Whether CUDA enumerates the physical GPUs in PCI bus order, the order NVML counts in."""
    if os.environ.get("CUDA_DEVICE_ORDER", "FASTEST_FIRST") == "PCI_BUS_ID":
        return True
    return len({_name(nvml, h) for h in physical}) <= 1  # same model: FASTEST_FIRST ties go by PCI bus id


def _mig_handles(nvml: Any, physical: Sequence[Any], wanted: Sequence[str]) -> list[Any]:
    """The MIG instances ``CUDA_VISIBLE_DEVICES`` names (``MIG-<uuid>`` prefixes), in its order."""
    instances = []
    for handle in physical:
        try:
            if nvml.nvmlDeviceGetMigMode(handle)[0] != nvml.NVML_DEVICE_MIG_ENABLE:
                continue
            for i in range(nvml.nvmlDeviceGetMaxMigDeviceCount(handle)):
                try:
                    instances.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(handle, i))
                except nvml.NVMLError:
                    continue  # an empty slot
        except nvml.NVMLError:
            continue  # not a MIG-capable GPU
    uuids = [_uuid(nvml, h) for h in instances]
    ordinals = torch.cuda._transform_uuid_to_ordinals(list(wanted), uuids)
    return [instances[i] for i in ordinals]


def _nvml_info(nvml: Any, index: int, handle: Any) -> GPUInfo:
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    try:
        util: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
    except nvml.NVMLError:  # not supported on MIG instances and some boards
        util = None
    try:
        procs: tuple[str, ...] | None = tuple(
            f"pid {p.pid} ({_bytes(p.usedGpuMemory)})"
            for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)
        )
    except nvml.NVMLError:
        procs = None
    return GPUInfo(
        index, _name(nvml, handle), int(memory.total), int(memory.free), util, procs, _uuid(nvml, handle)
    )


def process_ids(nvml: Any, handle: Any) -> set[int]:
    """The pids NVML lists as computing on ``handle``."""
    return {int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)}


def _uuid(nvml: Any, handle: Any) -> str:
    return _text(nvml.nvmlDeviceGetUUID(handle))


def _name(nvml: Any, handle: Any) -> str:
    return _text(nvml.nvmlDeviceGetName(handle))


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _bytes(n: int | None) -> str:
    return "memory n/a" if n is None else format_bytes(n)
