"""Apply a placement plan: move every entry to its device and hook the moves of activations.

A placed submodule's inputs (any nesting of tensors) are moved to its device before it runs, and the
outputs of the model are moved to the plan's output device. :class:`PlacementHandle` takes the hooks off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_gpupar.model_split.paths import common_ancestor, is_container, is_within, join
from lightning_gpupar.model_split.plan import PlacementPlan


class PlacementHandle:
    """The hooks :func:`apply_placement` added; ``remove()`` takes them off (the tensors stay put)."""

    def __init__(self, handles: list[RemovableHandle]) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def apply_placement(root: nn.Module, plan: PlacementPlan) -> PlacementHandle:
    """Move every entry to its device and hook the moves of inputs and outputs (see the module doc)."""
    for entry in plan.entries:
        device = plan.devices[entry.position]
        module = root.get_submodule(entry.path)
        if entry.own_only:
            module._apply(lambda t, d=device: t.to(d), recurse=False)
        else:
            module.to(device)
    _move_free_modules(root, {e.path for e in plan.entries}, plan.output_device)

    handles: list[RemovableHandle] = []
    for entry in plan.entries:
        if entry.own_only:
            continue
        module = root.get_submodule(entry.path)
        targets = list(module.children()) if is_container(module) else [module]
        for target in targets:
            hook = _inputs_to(plan.devices[entry.position])
            handles.append(target.register_forward_pre_hook(hook, with_kwargs=True))
    parent = common_ancestor([e.path for e in plan.entries if not e.own_only])
    for path in {"", parent}:
        handles.append(root.get_submodule(path).register_forward_hook(_outputs_to(plan.output_device)))
    return PlacementHandle(handles)


def _move_free_modules(root: nn.Module, placed: set[str], device: torch.device) -> None:
    """Submodules outside every entry hold no parameters or buffers (metrics, activations): the output device.

    torchmetrics keeps its states outside the buffers; they follow ``.to()``.
    """

    def visit(path: str, module: nn.Module) -> None:
        if path in placed:
            return
        if not any(is_within(p, path) for p in placed):
            module.to(device)
            return
        for name, child in module.named_children():
            visit(join(path, name), child)

    for name, child in root.named_children():
        visit(name, child)


def _inputs_to(device: torch.device) -> Callable[..., tuple[Any, dict[str, Any]]]:
    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        return move_data_to_device(args, device), move_data_to_device(kwargs, device)

    return hook


def _outputs_to(device: torch.device) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return move_data_to_device(output, device)

    return hook
