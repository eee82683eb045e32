"""``strategy=single``: Lightning's single-device strategy with our checkpoint guarantees.

Canonical keys on save, tolerant load, atomic files and ``weights_only`` loads
(:class:`~lightning_gpupar.checkpoint.CanonicalCheckpointMixin`), as under every other strategy of ours.
Named ``SingleStrategy`` after its config (``strategy=single``), so that it does not shadow Lightning's
``SingleDeviceStrategy``.
"""

from __future__ import annotations

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.types import _DEVICE
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import SingleDeviceStrategy as LightningSingleDeviceStrategy
from typing_extensions import override

from lightning_gpupar.checkpoint import CanonicalCheckpointMixin


class SingleStrategy(CanonicalCheckpointMixin, LightningSingleDeviceStrategy):
    """One device, portable checkpoints.

    Args:
        device: the device to run on. ``None`` (the default): the one device the Trainer's
            ``accelerator`` and ``devices`` select, handed over as Lightning hands ``parallel_devices``
            to a parallel strategy.
    """

    strategy_name = "single"

    def __init__(
        self,
        device: _DEVICE | None = None,
        accelerator: Accelerator | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            device="cpu" if device is None else device,
            accelerator=accelerator,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._device_chosen = device is not None

    @property
    @override
    def parallel_devices(self) -> list[torch.device]:
        """The device once chosen; empty until then, which asks the Trainer for its devices."""
        return [self._root_device] if self._device_chosen else []

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device]) -> None:
        if len(devices) != 1:
            raise ValueError(
                f"{type(self).__name__} runs on one device, but the Trainer selected {len(devices)}: "
                f"{[str(d) for d in devices]}. Pass devices=1 (or one GPU id), or a parallel strategy "
                "(strategy=dp, strategy=ddp)."
            )
        self._root_device = devices[0]
        self._device_chosen = True
