"""Placement plans: which submodule of a model lives on which device, computed before anything moves.

A placement maps submodule paths (ranges allowed, :mod:`~lightning_gpupar.model_split.paths`) to positions
in a device list (the Trainer's devices)::

    {"model.embed": 0, "model.blocks.0-1": 0, "model.blocks.2-3": 1, "model.head": 1}

``"auto"`` balances parameter and buffer bytes over the devices, a whole stage at a time (see
:func:`infer_stages`), under optional per-position caps (``max_memory``).

A plan is computed from the module tree alone (sizes come from ``numel * element_size``), so it works on
a model built on the meta device and allocates nothing; :mod:`~lightning_gpupar.model_split.hooks` applies
it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_gpupar.devices import format_bytes, parse_bytes
from lightning_gpupar.model_split.errors import PlacementError
from lightning_gpupar.model_split.paths import (
    expand_path,
    find_submodule,
    holds_tensors,
    is_container,
    is_within,
    join,
    module_bytes,
    uncovered,
)

Placement = Mapping[str, int] | str | None


def _splittable(module: nn.Module, no_split: Sequence[str]) -> bool:
    """Containers whose children can live on different devices without touching user code."""
    return isinstance(module, nn.Sequential | nn.ModuleList) and type(module).__name__ not in no_split


def infer_stages(root: nn.Module, no_split: Sequence[str] = ()) -> list[str]:
    """The model's stages, in registration order: the chain a pipeline runs and ``"auto"`` balances.

    Starting at the root, descend while exactly one child holds tensors (``LightningModule`` ->
    ``model``). That module's children are the stages; ``ModuleList`` / ``nn.Sequential`` children are
    expanded into their items. For an ``nn.Sequential`` every child is a stage; for any other module only
    the children holding tensors are, in the order they were registered (declare ``stages`` when the
    forward calls them in another order).
    """
    path, module = "", root
    while not holds_tensors(module, recurse=False) and type(module).__name__ not in no_split:
        holders = [(n, c) for n, c in module.named_children() if holds_tensors(c)]
        if len(holders) != 1 or not any(True for _ in holders[0][1].children()):
            break
        if isinstance(module, nn.Sequential) and len(module) > 1:
            break
        path, module = join(path, holders[0][0]), holders[0][1]
    chain = isinstance(module, nn.Sequential)
    stages: list[str] = []
    for name, child in module.named_children():
        if not chain and not holds_tensors(child):
            continue
        if _splittable(child, no_split) or is_container(child):
            stages += [join(join(path, name), n) for n, _ in child.named_children()]
        else:
            stages.append(join(path, name))
    return stages or [path]


# ------------------------------------------------------------------------------------------------ plan


@dataclass(frozen=True)
class PlacedModule:
    """One row of a plan: a submodule (``own_only``: just its own tensors, not its children's)."""

    path: str
    position: int
    own_only: bool
    num_params: int
    num_bytes: int
    source: str  # "map", "auto" or "default"


@dataclass(frozen=True)
class PlacementPlan:
    """Where every parameter and buffer goes; ``output_position`` is where the model's outputs land."""

    devices: tuple[torch.device, ...]
    entries: tuple[PlacedModule, ...]
    output_position: int

    @property
    def output_device(self) -> torch.device:
        return self.devices[self.output_position]

    def position_of(self, path: str) -> int | None:
        """The position of the entry holding ``path`` (the entry itself or an ancestor), if any."""
        for entry in self.entries:
            if not entry.own_only and is_within(path, entry.path):
                return entry.position
        return None

    def bytes_per_position(self) -> list[int]:
        totals = [0] * len(self.devices)
        for entry in self.entries:
            totals[entry.position] += entry.num_bytes
        return totals

    def table(self) -> str:
        """The plan as a text table: one row per submodule, then the totals per device."""
        rows = [("submodule", "position", "device", "parameters", "bytes")]
        for e in self.entries:
            name = (e.path or "(root)") + (" (own tensors)" if e.own_only else "")
            name += " [default]" if e.source == "default" else ""
            where = str(self.devices[e.position])
            rows.append((name, str(e.position), where, f"{e.num_params:,}", format_bytes(e.num_bytes)))
        rows.append(("", "", "", "", ""))
        params = [0] * len(self.devices)
        for e in self.entries:
            params[e.position] += e.num_params
        for pos, (device, total) in enumerate(zip(self.devices, self.bytes_per_position(), strict=True)):
            marker = "  <- output" if pos == self.output_position else ""
            rows.append((f"total{marker}", str(pos), str(device), f"{params[pos]:,}", format_bytes(total)))
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)

    def check_free_memory(self, free_bytes: Callable[[torch.device], int | None] | None = None) -> None:
        """Fail, with the numbers, if a device has less free memory than its parameters and buffers need."""
        free_bytes = free_bytes or cuda_free_bytes
        need: dict[torch.device, int] = {}
        for device, total in zip(self.devices, self.bytes_per_position(), strict=True):
            need[device] = need.get(device, 0) + total
        short = []
        for device, total in need.items():
            free = free_bytes(device)
            if free is not None and total > free:
                short.append(f"{device} needs {format_bytes(total)} but has {format_bytes(free)} free")
        if short:
            raise PlacementError(
                "The placement does not fit: "
                + "; ".join(short)
                + " (parameters and buffers only; gradients and optimizer state need more). "
                "Move submodules to other devices, add devices, or use placement='auto' with max_memory.\n"
                + self.table()
            )


def cuda_free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device (``None`` for other devices: not checked)."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.mem_get_info(device)[0])


def plan_placement(
    root: nn.Module,
    devices: Sequence[torch.device],
    placement: Placement = "auto",
    *,
    stages: Sequence[str] | None = None,
    default_device: int | None = None,
    output_device: int | None = None,
    max_memory: Mapping[Any, int | str] | None = None,
    no_split: Sequence[str] = (),
) -> PlacementPlan:
    """Plan where each submodule of ``root`` goes, without moving anything.

    ``placement``: a map of submodule paths (ranges allowed) to positions in ``devices``, or ``"auto"``
    (``None`` means ``"auto"``). Tensors outside the map go to ``default_device`` or are an error.
    ``stages``: for ``"auto"``, the ordered units to balance (default: :func:`infer_stages`).
    ``output_device``: the position where outputs land (default: the last placed submodule's).
    ``max_memory``: ``{position: "10GiB"}`` caps for ``"auto"``. ``no_split``: class names never split.
    """
    devices = tuple(devices)
    if not devices:
        raise PlacementError("A placement needs at least one device.")
    for name, value in (("default_device", default_device), ("output_device", output_device)):
        if value is not None:
            _check_position(value, devices, name)
    if placement is None or placement == "auto":
        entries = _auto(root, devices, stages, _caps(max_memory, devices), no_split)
    elif isinstance(placement, str):
        raise PlacementError(
            f"placement={placement!r}: write 'auto' or a map of submodule paths to device positions, "
            "e.g. {model.encoder: 0, model.decoder: 1}."
        )
    else:
        entries = _manual(root, devices, placement, default_device)
    _check_tied(root, entries)
    order = {name: i for i, (name, _) in enumerate(root.named_modules())}
    entries.sort(key=lambda e: (order[e.path], not e.own_only))
    if output_device is None:
        placed = [e for e in entries if e.source != "default" and not e.own_only] or entries
        output_device = placed[-1].position if placed else 0
    return PlacementPlan(devices, tuple(entries), output_device)


def _check_position(value: Any, devices: Sequence[torch.device], what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(devices):
        listing = ", ".join(f"{i}: {d}" for i, d in enumerate(devices))
        raise PlacementError(
            f"{what}: position {value!r} is out of range. Positions count the Trainer's devices from 0; "
            f"there are {len(devices)} ({listing})."
        )
    return value


def _entry(root: nn.Module, path: str, position: int, source: str, own_only: bool = False) -> PlacedModule:
    params, nbytes = module_bytes(root.get_submodule(path), recurse=not own_only)
    return PlacedModule(path, position, own_only, params, nbytes, source)


def _manual(
    root: nn.Module, devices: Sequence[torch.device], placement: Mapping[str, int], default: int | None
) -> list[PlacedModule]:
    owners: dict[str, str] = {}  # expanded path -> the key that placed it
    entries = []
    for key, position in placement.items():
        _check_position(position, devices, f"placement[{key!r}]")
        for path in expand_path(root, str(key)):
            for other, other_key in owners.items():
                if is_within(path, other) or is_within(other, path):
                    clash = "both" if path == other else f"{other!r} and {path!r}"
                    raise PlacementError(
                        f"Overlapping placement: {other_key!r} and {key!r} both place {clash}. "
                        "Place each submodule once (a parent moves all its children)."
                    )
            owners[path] = str(key)
            entries.append(_entry(root, path, position, "map"))
    leftovers = uncovered(root, set(owners))
    if leftovers and default is None:
        listing = ", ".join(f"{p or '(root)'}{' (own tensors)' if own else ''}" for p, own in leftovers)
        raise PlacementError(
            f"These submodules hold parameters or buffers but are in no placement entry: {listing}. "
            "Add them to the placement, or set default_device to the position that should take them."
        )
    entries += [_entry(root, p, default, "default", own) for p, own in leftovers if default is not None]
    return entries


def _caps(max_memory: Mapping[Any, int | str] | None, devices: Sequence[torch.device]) -> list[float]:
    caps = [float("inf")] * len(devices)
    for key, value in (max_memory or {}).items():
        pos = int(key) if isinstance(key, str) and key.isdigit() else key
        caps[_check_position(pos, devices, f"max_memory[{key!r}]")] = parse_bytes(value)
    return caps


def _auto(
    root: nn.Module,
    devices: Sequence[torch.device],
    stages: Sequence[str] | None,
    caps: list[float],
    no_split: Sequence[str],
) -> list[PlacedModule]:
    """Greedy, in order: fill each device up to its share of the bytes (or its cap), then the next."""
    atomic = stages is not None
    units = deque(_units(root, list(stages) if stages is not None else infer_stages(root, no_split)))
    total = sum(u.num_bytes for u in units)
    used = [0] * len(devices)
    pos, last = 0, len(devices) - 1
    target = total / len(devices)
    entries = []
    while units:
        unit = units.popleft()
        if unit.num_bytes == 0:
            continue
        new = used[pos] + unit.num_bytes
        module = root.get_submodule(unit.path)
        if new <= caps[pos] and (pos == last or new <= target):
            pass
        elif not atomic and not unit.own_only and _splittable(module, no_split):
            children = [_entry(root, join(unit.path, n), 0, "auto") for n, _ in module.named_children()]
            units.extendleft(reversed(children))
            continue
        elif new <= caps[pos] and pos < last and new - target < target - used[pos]:
            pass  # closer to this device's share with the unit than without it
        elif pos < last:
            pos += 1
            target = (total - sum(used)) / (len(devices) - pos)
            units.appendleft(unit)
            continue
        else:
            raise PlacementError(
                f"placement='auto' cannot fit {unit.path or '(root)'} ({format_bytes(unit.num_bytes)}): "
                f"position {pos} ({devices[pos]}) already holds {format_bytes(used[pos])} of its "
                f"{format_bytes(caps[pos])} max_memory. Total {format_bytes(total)} over caps "
                f"{[format_bytes(c) if c != float('inf') else 'none' for c in caps]}: raise max_memory or "
                "add devices."
            )
        used[pos] = new
        entries.append(PlacedModule(unit.path, pos, unit.own_only, unit.num_params, unit.num_bytes, "auto"))
    return entries


def _units(root: nn.Module, stages: list[str]) -> list[PlacedModule]:
    """Stages in their order, plus everything else holding tensors, in registration order."""
    stages = [p for s in stages for p in _uncontain(root, s)]
    units: list[PlacedModule] = []
    emitted = False

    def visit(path: str, module: nn.Module) -> None:
        nonlocal emitted
        if path in stages:
            if not emitted:
                units.extend(_entry(root, s, 0, "auto") for s in stages)
                emitted = True
            return
        if not any(is_within(s, path) for s in stages):
            if holds_tensors(module):
                units.append(_entry(root, path, 0, "auto"))
            return
        if holds_tensors(module, recurse=False):
            units.append(_entry(root, path, 0, "auto", own_only=True))
        for name, child in module.named_children():
            visit(join(path, name), child)

    visit("", root)
    return units


def _uncontain(root: nn.Module, path: str) -> list[str]:
    """A ModuleList / ModuleDict is never called: its items are the stages."""
    module = find_submodule(root, path)
    return [join(path, n) for n, _ in module.named_children()] if is_container(module) else [path]


def _check_tied(root: nn.Module, entries: Sequence[PlacedModule]) -> None:
    """A parameter shared by two entries must not be placed on two positions."""
    seen: dict[int, tuple[str, int]] = {}
    for entry in entries:
        module = root.get_submodule(entry.path)
        for name, param in module.named_parameters(recurse=not entry.own_only, remove_duplicate=False):
            where = (join(entry.path, name), entry.position)
            first = seen.setdefault(id(param), where)
            if first[1] != entry.position:
                raise PlacementError(
                    f"{first[0]} and {where[0]} are the same (tied) parameter, placed on positions "
                    f"{first[1]} and {where[1]}. Place both submodules on one device."
                )
