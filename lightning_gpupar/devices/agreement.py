"""A strategy given its own devices (``parallel_devices``) must agree with the Trainer's ``devices``.

Lightning keeps a strategy's ``parallel_devices`` and drops ``Trainer(devices=...)`` without a word:
``DataParallelStrategy(parallel_devices=[cpu] * 3)`` with ``Trainer(devices=2)`` ran 3 replicas. Here the
two must name the same devices. Lightning turns ``devices="auto"`` (the default) into the accelerator's
own count before a strategy can see it, so a request equal to that count (1 on the CPU, every visible
GPU) cannot be told from "auto" and is taken as "use the strategy's devices".
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from lightning_gpupar.devices.requests import DeviceSelectionError


def check_strategy_devices(trainer: Any, strategy: str, given: Sequence[torch.device] | None) -> None:
    """Refuse when ``trainer``'s ``devices`` request names other devices than the strategy's ``given``."""
    connector = getattr(trainer, "_accelerator_connector", None)
    requested = getattr(connector, "_devices_flag", None)
    accelerator = getattr(connector, "accelerator", None)
    if not given or requested is None or accelerator is None:
        return
    kind = type(accelerator)
    if requested == kind.parse_devices(accelerator.auto_device_count()):  # "auto", or the same as it
        return
    wanted = [torch.device(d) for d in kind.get_parallel_devices(requested)]
    have = [torch.device(d) for d in given]
    if wanted == have:
        return
    raise DeviceSelectionError(
        f"Trainer(devices={requested!r}) asks for {len(wanted)} device(s) ({_names(wanted)}), but "
        f"{strategy}(parallel_devices=...) was given {len(have)} ({_names(have)}): the strategy's list would "
        "win without a word. Give the devices once: drop parallel_devices and keep Trainer(devices=...), or "
        "leave Trainer(devices=...) unset."
    )


def _names(devices: Sequence[torch.device]) -> str:
    return ", ".join(map(str, devices))
