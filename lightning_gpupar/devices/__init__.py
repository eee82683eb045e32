"""Devices: requests -> torch devices (:mod:`.requests`), NVML facts (:mod:`.nvml`), per-GPU locks
(:mod:`.locks`) and byte sizes (:mod:`.sizes`). See docs/devices.md."""

from lightning_gpupar.devices.nvml import GPUInfo, GPUInventory, NVMLUnavailable, read_gpus
from lightning_gpupar.devices.requests import (
    AUTO_IDS_ENV,
    LAUNCHER_PID_ENV,
    DeviceSelection,
    DeviceSelectionError,
    auto_select,
    cuda_device_count,
    external_launch,
    query_gpus,
    query_inventory,
    resolve_devices,
)
from lightning_gpupar.devices.sizes import format_bytes, parse_bytes

__all__ = [
    "AUTO_IDS_ENV",
    "LAUNCHER_PID_ENV",
    "DeviceSelection",
    "DeviceSelectionError",
    "GPUInfo",
    "GPUInventory",
    "NVMLUnavailable",
    "auto_select",
    "cuda_device_count",
    "external_launch",
    "format_bytes",
    "parse_bytes",
    "query_gpus",
    "query_inventory",
    "read_gpus",
    "resolve_devices",
]
