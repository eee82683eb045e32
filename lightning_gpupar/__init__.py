"""Multi-GPU strategies for PyTorch Lightning 2.x, chosen from Hydra configs.

Importing the package registers our strategy names ("dp", "model_split", "ddp_split") in Lightning's
StrategyRegistry.
"""

from lightning_gpupar.checkpoint import NormalizeCheckpointKeys
from lightning_gpupar.devices import DeviceSelection, DeviceSelectionError, resolve_devices
from lightning_gpupar.errors import GpuparError
from lightning_gpupar.strategies import (
    DataParallelStrategy,
    DDPSplitStrategy,
    DDPStrategy,
    ModelSplitStrategy,
    SingleStrategy,
    register_strategies,
)

register_strategies()

__all__ = [
    "DDPSplitStrategy",
    "DDPStrategy",
    "DataParallelStrategy",
    "DeviceSelection",
    "DeviceSelectionError",
    "GpuparError",
    "ModelSplitStrategy",
    "NormalizeCheckpointKeys",
    "SingleStrategy",
    "resolve_devices",
]
__version__ = "0.1.0"
