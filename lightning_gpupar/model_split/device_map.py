"""``placement="device_map"``: a placement map read from the ``hf_device_map`` transformers / accelerate set.

``from_pretrained(..., device_map=...)`` and ``accelerate.dispatch_model`` leave ``hf_device_map`` on the
model they placed: ``{"model.embed_tokens": 0, "model.layers.0": 0, ..., "lm_head": "cpu"}``, keys relative
to that model. Here the keys become paths from the LightningModule, and the values positions in the
strategy's devices: a CUDA index (``0``, ``"cuda:0"``) names that GPU, which must be one of the chosen ones;
``"cpu"`` names the CPU device among them. On CPU devices only (tests, dry runs) an int is a position and
``"cpu"`` the last position.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_gpupar.model_split.errors import PlacementError
from lightning_gpupar.model_split.paths import find_submodule, is_within, join

#: The placement value that reads the model's ``hf_device_map``.
DEVICE_MAP = "device_map"


def find_device_maps(root: nn.Module) -> dict[str, Mapping[str, Any]]:
    """Each submodule path holding its own ``hf_device_map`` (not one forwarded by a PEFT wrapper)."""
    found = {}
    for path, module in root.named_modules():
        device_map = module.__dict__.get("hf_device_map")
        if isinstance(device_map, Mapping):
            found[path] = device_map
    return found


def device_map_placement(root: nn.Module, devices: Sequence[torch.device]) -> dict[str, int]:
    """The placement map (paths from ``root`` -> positions in ``devices``) the model's device map says."""
    maps = find_device_maps(root)
    if not maps:
        raise PlacementError(
            "placement='device_map', but no submodule of the LightningModule has an hf_device_map. Load "
            "the model with from_pretrained(..., device_map=...) (or accelerate.dispatch_model), or write "
            "a placement map of submodule paths to device positions, or use placement='auto'."
        )
    nested = [(a, b) for a in maps for b in maps if a != b and is_within(b, a)]
    if nested:
        outer, inner = nested[0]
        raise PlacementError(
            f"placement='device_map': both {outer or '(root)'} and its submodule {inner} carry an "
            "hf_device_map; keep the one that describes the model and delete the other."
        )
    placement: dict[str, int] = {}
    for prefix, device_map in maps.items():
        owner = f"the hf_device_map of {prefix or 'the LightningModule'}"
        for key, value in device_map.items():
            path = join(prefix, str(key)) if key else prefix
            entry = f"placement='device_map': {owner}, entry {key!r}: {value!r}"
            try:
                find_submodule(root, path)
            except PlacementError as err:
                raise PlacementError(f"{entry}: {err}") from None
            placement[path] = _position(value, devices, entry)
    return placement


def _position(value: Any, devices: Sequence[torch.device], entry: str) -> int:
    """The position in ``devices`` a device-map value names (see the module docstring)."""
    listing = ", ".join(f"{i}: {d}" for i, d in enumerate(devices))
    on_cpu = all(d.type == "cpu" for d in devices)
    if isinstance(value, torch.device):
        value = str(value)
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "cpu":
            cpus = [i for i, d in enumerate(devices) if d.type == "cpu"]
            if not cpus:
                raise PlacementError(
                    f"{entry}: the strategy's devices ({listing}) include no CPU. Add it as a stage device "
                    "(strategy.device_ids=[0,1,cpu]), or load the model without CPU entries."
                )
            return cpus[-1]
        if text.startswith("cuda:") and text[5:].isdigit():
            value = int(text[5:])
        elif text.isdigit():
            value = int(text)
        else:
            raise PlacementError(
                f"{entry}: placement trains each part on a device; {value!r} is not one (valid: a CUDA "
                f"index among the strategy's devices, or 'cpu'; the devices are {listing}). Load the model "
                "without disk offload, or with the device as a CUDA index or 'cpu'."
            )
    if isinstance(value, bool) or not isinstance(value, int):
        raise PlacementError(f"{entry}: write a CUDA index or 'cpu' (the devices are {listing}).")
    if on_cpu:
        if not 0 <= value < len(devices):
            raise PlacementError(
                f"{entry}: on CPU devices an int is a position in the strategy's devices; there are "
                f"{len(devices)} ({listing}), so {value} is out of range."
            )
        return value
    wanted = torch.device("cuda", value)
    if wanted not in devices:
        raise PlacementError(
            f"{entry}: cuda:{value} is not among the strategy's devices ({listing}). Choose it in "
            "strategy.device_ids, or load the model with a device_map (or max_memory) over the chosen GPUs."
        )
    return list(devices).index(wanted)
