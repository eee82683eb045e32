"""Apply a placement plan: move every entry to its device and hook the moves of activations.

A placed submodule's inputs (any nesting of tensors) are moved to its device before it runs, and the
outputs of the model are moved to the plan's output device. :class:`PlacementHandle` takes the hooks off.

Each tensor moves at most once, and only when it is not on its device yet. Accelerate's device hooks (a
model dispatched with a ``device_map``) are removed first: ours replace them. A parameter whose class moves
itself (bitsandbytes' quantized ``Params4bit`` / ``Int8Params``) is never moved or cast: it must already be
on its device, or placement refuses before anything moves.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn
from torch.utils.hooks import RemovableHandle

from lightning_gpupar.model_split.errors import PlacementError
from lightning_gpupar.model_split.paths import common_ancestor, is_container, is_within, join
from lightning_gpupar.model_split.plan import PlacementPlan
from lightning_gpupar.model_split.precision import float32_inputs

#: The methods through which a tensor changes device or dtype; a Parameter class overriding one moves itself.
_MOVERS = ("to", "cuda", "cpu", "half", "float", "double", "bfloat16", "type", "_to_copy")


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
    check_self_moving(root, plan)
    remove_accelerate_hooks(root)
    replaced: dict[int, nn.Parameter] = {}
    for entry in plan.entries:
        module = root.get_submodule(entry.path)
        _move_tensors(module, plan.devices[entry.position], not entry.own_only, replaced)
    _move_free_modules(root, {e.path for e in plan.entries}, plan.output_device)

    handles: list[RemovableHandle] = []
    for entry in plan.entries:
        if entry.own_only:
            continue
        module = root.get_submodule(entry.path)
        targets = list(module.children()) if is_container(module) else [module]
        for target in targets:
            float32 = bool(plan.precision) and plan.precision[entry.position].casts_inputs
            hook = _inputs_to(plan.devices[entry.position], float32)
            handles.append(target.register_forward_pre_hook(hook, with_kwargs=True))
    parent = common_ancestor([e.path for e in plan.entries if not e.own_only])
    for path in {"", parent}:
        handles.append(root.get_submodule(path).register_forward_hook(_outputs_to(plan.output_device)))
    return PlacementHandle(handles)


def moves_itself(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a Parameter of a class that moves or casts itself its own way (bitsandbytes'
    ``Params4bit`` quantizes on ``.to("cuda")``): placement must never call those methods."""
    cls = type(tensor)
    if cls is nn.Parameter or not isinstance(tensor, nn.Parameter):
        return False
    return any(getattr(cls, name, None) is not getattr(nn.Parameter, name, None) for name in _MOVERS)


def check_self_moving(root: nn.Module, plan: PlacementPlan) -> None:
    """Refuse, before anything moves, a plan that would move a parameter that moves itself (quantized)."""
    wrong = []
    for entry in plan.entries:
        device = plan.devices[entry.position]
        module = root.get_submodule(entry.path)
        for name, param in module.named_parameters(recurse=not entry.own_only):
            if moves_itself(param) and param.device != device:
                where = f"{join(entry.path, name)} ({type(param).__name__}) is on {param.device}"
                wrong.append(f"{where}, the plan puts it on position {entry.position} ({device})")
    if wrong:
        raise PlacementError(
            "Quantized parameters stay where they were loaded; placement does not move or cast them: "
            + "; ".join(wrong[:5])
            + (f" (and {len(wrong) - 5} more)" if len(wrong) > 5 else "")
            + ". Place those submodules on the devices that hold them (placement='device_map' reads the "
            "map they were loaded with), or load the model onto the planned devices."
        )


def remove_accelerate_hooks(root: nn.Module) -> None:
    """Take off accelerate's hooks (``dispatch_model``, ``from_pretrained(device_map=...)``): they would move
    every input and weight a second time; our placement hooks replace them. Offloaded weights come back."""
    if not any(hasattr(m, "_hf_hook") for m in root.modules()):
        return
    from accelerate.hooks import remove_hook_from_module  # present: it attached the hooks

    # One module at a time, only those that own a hook: a PEFT wrapper forwards ``_hf_hook`` from the model
    # it wraps, and accelerate's recursive removal would try (and fail) to delete it from the wrapper.
    for module in root.modules():
        owned = module.__dict__
        if (
            "_hf_hook" in owned
            or "_old_forward" in owned
            or any(getattr(v, "_accelerate_added_attribute", False) for v in owned.values())
        ):
            remove_hook_from_module(module, recurse=False)


def _move_tensors(
    module: nn.Module, device: torch.device, recurse: bool, replaced: dict[int, nn.Parameter]
) -> None:
    """``module.to(device)`` that leaves alone every tensor already there (no copy, no call) and never
    touches a parameter that moves itself (checked on its device by :func:`check_self_moving`).

    As in ``nn.Module._apply``, a parameter changes device in place where the tensor types allow it, else
    is replaced; ``replaced`` maps old to new, so that a tied parameter stays one."""
    for sub in module.modules() if recurse else [module]:
        for name, param in sub._parameters.items():
            if param is not None and id(param) in replaced:
                sub._parameters[name] = replaced[id(param)]
                continue
            if param is None or param.device == device or moves_itself(param):
                continue
            with torch.no_grad():
                moved = param.to(device)
                if torch._has_compatible_shallow_copy_type(param, moved):
                    param.data = moved  # in place: tied parameters and references stay one
                    if param.grad is not None:
                        param.grad = param.grad.to(device)
                else:  # e.g. to or from the meta device
                    replaced[id(param)] = sub._parameters[name] = nn.Parameter(moved, param.requires_grad)
        for name, buffer in sub._buffers.items():
            if buffer is not None and buffer.device != device:
                sub._buffers[name] = buffer.to(device)
        if type(sub)._apply is not nn.Module._apply:  # e.g. torchmetrics: states outside the buffers
            sub._apply(lambda t: t if t.device == device or moves_itself(t) else t.to(device))


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


def _inputs_to(
    device: torch.device, float32: bool = False
) -> Callable[..., tuple[Any, dict[str, Any]] | None]:
    """The pre-hook moving a stage's inputs to its device (and, for a float32 stage under mixed precision,
    casting its reduced-precision floating inputs to float32)."""

    def hook(module: nn.Module, args: Any, kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
        if float32:
            args, kwargs = apply_to_collection((args, kwargs), torch.Tensor, float32_inputs)
        elif all_on(args, device) and all_on(kwargs, device):
            return None  # already there (every call when the devices coincide): nothing to rebuild
        return move_data_to_device(args, device), move_data_to_device(kwargs, device)

    return hook


def all_on(data: Any, device: torch.device) -> bool:
    """Whether every tensor in ``data`` is on ``device``; a quick look, ``False`` when unsure.

    Plain tensors, tuples, lists and dicts are looked into; any other collection (a dataclass, a named
    tuple of a custom type...) answers ``False``, so the caller moves it the thorough way.
    """
    if isinstance(data, torch.Tensor):
        return data.device == device
    if type(data) in (tuple, list):
        return all(all_on(item, device) for item in data)
    if type(data) is dict:
        return all(all_on(item, device) for item in data.values())
    return isinstance(data, int | float | str | bool | type(None))


def _outputs_to(device: torch.device) -> Callable[[nn.Module, Any, Any], Any]:
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        return None if all_on(output, device) else move_data_to_device(output, device)

    return hook
