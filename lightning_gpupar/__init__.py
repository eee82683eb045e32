"""Multi-GPU strategies for PyTorch Lightning 2.x, chosen from Hydra configs."""

from lightning_gpupar.devices import DeviceSelection, DeviceSelectionError, resolve_devices

__all__ = ["DeviceSelection", "DeviceSelectionError", "resolve_devices"]
__version__ = "0.1.0"
