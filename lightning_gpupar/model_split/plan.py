"""Placement plans: which submodule of a model lives on which device, computed before anything moves.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/plan.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_gpupar.devices.sizes import format_bytes, parse_bytes
from lightning_gpupar.model_split import table
from lightning_gpupar.model_split.balance import by_memory as auto
from lightning_gpupar.model_split.device_map import DEVICE_MAP, device_map_placement
from lightning_gpupar.model_split.errors import PlacementError
from lightning_gpupar.model_split.memory import MemoryParts, ModelMemory, charge, measure_model
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
from lightning_gpupar.model_split.precision import StagePrecision

Placement = Mapping[str, int] | str | None


def _is_stage_container(module: nn.Module, no_split: Sequence[str]) -> bool:
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
    if type(module).__name__ in no_split:
        return [path]  # kept whole: one stage
    while not holds_tensors(module, recurse=False):
        holders = [(n, c) for n, c in module.named_children() if holds_tensors(c)]
        if len(holders) != 1 or not any(True for _ in holders[0][1].children()):
            break
        if isinstance(module, nn.Sequential) and len(module) > 1:
            break
        path, module = join(path, holders[0][0]), holders[0][1]
        if type(module).__name__ in no_split:
            return [path]  # kept whole: one stage
    chain = isinstance(module, nn.Sequential)
    stages: list[str] = []
    for name, child in module.named_children():
        if not chain and not holds_tensors(child):
            continue
        if _is_stage_container(child, no_split) or is_container(child):
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
    memory: MemoryParts = dataclasses.field(default_factory=MemoryParts)  # training needs (tied: with owner)


@dataclass(frozen=True)
class PlacementPlan:
    """Where every parameter and buffer goes; ``output_position`` is where the model's outputs land."""

    devices: tuple[torch.device, ...]
    entries: tuple[PlacedModule, ...]
    output_position: int
    caps: tuple[float, ...] = ()  # max_memory per position (inf: none)
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)  # how each part was found
    tied: Mapping[str, str] = dataclasses.field(default_factory=dict)  # shared parameter -> its owner
    precision: tuple[StagePrecision, ...] = ()  # under mixed precision: how each position computes
    aliases: Mapping[str, str] = dataclasses.field(default_factory=dict)  # module registered twice -> first

    @property
    def output_device(self) -> torch.device:
        return self.devices[self.output_position]

    def position_of(self, path: str) -> int | None:
        """The position of the entry holding ``path`` (the entry itself or an ancestor), if any; ``path`` may
        name a module (or a state-dict key) through any of the names the module is registered under."""
        for alias, first in self.aliases.items():
            if is_within(path, alias):
                path = first + path[len(alias) :]
        for entry in self.entries:
            if not entry.own_only and is_within(path, entry.path):
                return entry.position
        return None

    def bytes_per_position(self) -> list[int]:
        totals = [0] * len(self.devices)
        for entry in self.entries:
            totals[entry.position] += entry.num_bytes
        return totals

    def memory_per_position(self) -> list[MemoryParts]:
        """Training memory per position, part by part."""
        totals = [MemoryParts() for _ in self.devices]
        for entry in self.entries:
            totals[entry.position] = totals[entry.position] + entry.memory
        return totals

    def need_per_position(self) -> list[int]:
        """Bytes training needs per position: parameters, buffers, gradients, optimizer state, activations."""
        return [parts.total for parts in self.memory_per_position()]

    def table(self, free_bytes: Callable[[torch.device], int | None] | None = None) -> str:
        """The plan as text: one row per submodule, the totals per device, then the memory per device."""
        return self.entry_table() + self.precision_lines() + "\n\n" + table.memory_table(self, free_bytes)

    def precision_lines(self) -> str:
        """Under mixed precision, how each device computes (``""`` otherwise)."""
        if not self.precision:
            return ""
        lines = [
            f"  {pos} ({device}): {p.describe()}"
            for pos, (device, p) in enumerate(zip(self.devices, self.precision, strict=True))
        ]
        return "\n\nprecision per device:\n" + "\n".join(lines)

    def entry_table(self) -> str:
        """One row per submodule, then the parameter totals per device."""
        rows = [("submodule", "position", "device", "parameters", "bytes")]
        for e in self.entries:
            name = (e.path or "(root)") + (" (own tensors)" if e.own_only else "")
            name += " [default]" if e.source == "default" else ""
            where = str(self.devices[e.position])
            rows.append((name, str(e.position), where, f"{e.num_params:,}", format_bytes(e.num_bytes)))
        for alias, first in self.aliases.items():
            position = self.position_of(first)
            if position is not None:
                rows.append(
                    (
                        f"{alias} (same module as {first})",
                        str(position),
                        str(self.devices[position]),
                        "0",
                        "0 B",
                    )
                )
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
        for device, total in zip(self.devices, self.need_per_position(), strict=True):
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
                + " (parameters, buffers, gradients, optimizer state and activations). "
                "Move submodules to other devices, add devices, or use placement='auto' with max_memory.\n"
                + self.table(free_bytes)
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
    optimizer: torch.optim.Optimizer | None = None,
    example_input: Any = None,
    partition: auto.Partitioner | None = None,
) -> PlacementPlan:
    """Plan where each submodule of ``root`` goes, without moving anything.

    ``placement``: a map of submodule paths (ranges allowed) to positions in ``devices``, ``"auto"``
    (``None`` means ``"auto"``), or ``"device_map"``: the model's ``hf_device_map``
    (:mod:`~lightning_gpupar.model_split.device_map`). Tensors outside the map go to ``default_device`` or
    are an error.
    ``stages``: for ``"auto"``, the ordered units to place, each whole (default: walk the module tree).
    ``output_device``: the position where outputs land (default: the last placed submodule's).
    ``max_memory``: ``{position: "10GiB"}`` caps on the training memory of each position.
    ``no_split``: class names ``"auto"`` keeps whole. ``optimizer``: the one training will use (its state
    counts; default: Adam-style assumed). ``example_input``: a forward's input (a tuple: positional
    arguments, a dict: keyword arguments) whose saved activations are measured on the meta device.
    ``partition``: how ``"auto"`` cuts the chain units into devices (default:
    :func:`~lightning_gpupar.model_split.balance.by_memory.balance_memory`).
    """
    devices = tuple(devices)
    if not devices:
        raise PlacementError("A placement needs at least one device.")
    for name, value in (("default_device", default_device), ("output_device", output_device)):
        if value is not None:
            _check_position(value, devices, name)
    caps = _caps(max_memory, devices)
    _check_no_split(root, no_split)
    memory = measure_model(root, optimizer, example_input)
    order = auto.execution_order(root, memory)
    if placement is None or placement == "auto":
        entries = _auto(root, devices, stages, caps, no_split, memory, partition or auto.balance_memory)
    elif placement == DEVICE_MAP:
        try:
            entries = _manual(root, devices, device_map_placement(root, devices), default_device)
            _check_tied(root, entries)
        except PlacementError as err:
            if str(err).startswith("placement='device_map'"):
                raise
            raise PlacementError(f"placement='device_map' (read from hf_device_map): {err}") from None
    elif isinstance(placement, str):
        raise PlacementError(
            f"placement={placement!r}: write 'auto' or a map of submodule paths to device positions, e.g. "
            "{model.encoder: 0, model.decoder: 1}, or 'device_map' (the model's hf_device_map)."
        )
    else:
        entries = _manual(root, devices, placement, default_device)
    _check_tied(root, entries)
    entries.sort(key=lambda e: (order[e.path], not e.own_only))
    entries = _with_memory(root, entries, memory)
    if output_device is None:
        placed = [e for e in entries if e.source != "default" and not e.own_only] or entries
        output_device = placed[-1].position if placed else 0
    aliases = module_aliases(root)
    return PlacementPlan(
        devices, tuple(entries), output_device, tuple(caps), memory.sources, memory.tied, aliases=aliases
    )


def module_aliases(root: nn.Module) -> dict[str, str]:
    """Each further name of a module holding tensors registered under several (``nn.Sequential(layer,
    layer)``) -> its first name; names below an alias are left out (they follow from it)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for path, module in root.named_modules(remove_duplicate=False):
        if id(module) not in first:
            first[id(module)] = path
        elif holds_tensors(module) and not any(is_within(path, alias) for alias in aliases):
            aliases[path] = first[id(module)]
    return aliases


def _with_memory(root: nn.Module, entries: list[PlacedModule], memory: ModelMemory) -> list[PlacedModule]:
    """Each entry with its training memory, a tensor shared by several entries counted in the first."""
    parts = charge([(e.path, e.own_only) for e in entries], memory)
    seen: set[int] = set()
    result = []
    for entry, part in zip(entries, parts, strict=True):
        module = root.get_submodule(entry.path)
        params = [p for p in module.parameters(entry.own_only is False) if id(p) not in seen]
        tensors = params + [b for b in module.buffers(entry.own_only is False) if id(b) not in seen]
        seen |= {id(t) for t in tensors}
        count = sum(p.numel() for p in params)
        nbytes = sum(t.numel() * t.element_size() for t in tensors)
        result.append(dataclasses.replace(entry, num_params=count, num_bytes=nbytes, memory=part))
    return result


def _check_no_split(root: nn.Module, no_split: Sequence[str]) -> None:
    """A class name in ``no_split`` must name a class of the model."""
    classes = sorted({type(m).__name__ for m in root.modules()})
    unknown = [name for name in no_split if name not in classes]
    if unknown:
        raise PlacementError(
            f"no_split names {unknown}, but the model has no module of that class. Its classes: "
            f"{', '.join(classes)}."
        )


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


def parse_max_memory(
    max_memory: Mapping[Any, int | str] | None, devices: Sequence[torch.device] | None = None
) -> dict[int, int]:
    """``max_memory`` as ``{position: bytes}``: every key a device position (an int or a digit string; in
    range when ``devices`` are known), every size a positive byte count or a size string."""
    count = len(devices) if devices is not None else None
    if devices is not None:
        valid = f"positions 0..{len(devices) - 1} ({', '.join(map(str, devices))})"
    else:
        valid = "positions 0, 1, ... in the Trainer's devices"
    caps: dict[int, int] = {}
    for key, value in (max_memory or {}).items():
        pos = int(key) if isinstance(key, str) and key.strip().isdigit() else key
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos < (count or pos + 1):
            raise PlacementError(
                f"max_memory[{key!r}]: the keys are device positions, {valid}; {key!r} is not one."
            )
        try:
            size = (
                parse_bytes(value) if isinstance(value, str | int) and not isinstance(value, bool) else None
            )
        except ValueError:
            size = None
        if size is None or size <= 0:
            raise PlacementError(
                f"max_memory[{key!r}]={value!r} is not a positive size: write bytes as an int, or a size "
                "such as '512MiB', '10GiB' or '1.5GB'."
            )
        caps[pos] = size
    return caps


def _caps(max_memory: Mapping[Any, int | str] | None, devices: Sequence[torch.device]) -> list[float]:
    """``max_memory`` as a cap per position (``inf``: none)."""
    caps = [float("inf")] * len(devices)
    for pos, size in parse_max_memory(max_memory, devices).items():
        caps[pos] = size
    return caps


def _auto(
    root: nn.Module,
    devices: Sequence[torch.device],
    stages: Sequence[str] | None,
    caps: list[float],
    no_split: Sequence[str],
    memory: ModelMemory,
    partition: auto.Partitioner,
) -> list[PlacedModule]:
    """Chain units (the tree walk, or the stages), tied groups merged, partitioned over the devices."""
    keep_whole = auto.model_no_split(root, no_split)
    if stages is not None:
        units = [(u.path, u.own_only) for u in _units(root, list(stages))]
    else:
        units = auto.walk_units(root, memory, caps, keep_whole)
    try:
        chain, positions = auto.search(
            root, units, memory, caps, None if stages is not None else keep_whole, partition
        )
    except auto.NoFit as no_fit:
        message = _no_fit_message(root, devices, no_fit.chain, caps, keep_whole, set(no_split))
        raise PlacementError(message) from None
    entries = []
    for unit, position in zip(chain, positions, strict=True):
        for path, own_only in unit.units:
            entries.append(_entry(root, path, position, "auto", own_only))
    return entries


def _no_fit_message(
    root: nn.Module,
    devices: Sequence[torch.device],
    chain: Sequence[auto.ChainUnit],
    caps: list[float],
    keep_whole: set[str],
    user_no_split: set[str],
) -> str:
    """What each device would need, the caps, and the smallest change that fits."""
    costs = [u.cost for u in chain]
    uncapped = [float("inf")] * len(caps)
    positions = auto.balance_memory(chain, uncapped)
    need = [MemoryParts() for _ in caps]
    for unit, position in zip(chain, positions, strict=True):
        need[position] = need[position] + unit.memory
    lines = [
        f"placement='auto' cannot fit the model under max_memory: training needs {format_bytes(sum(costs))} "
        f"in total. Balanced without caps, each device would need:"
    ]
    for pos, parts in enumerate(need):
        cap = "no cap" if caps[pos] == float("inf") else f"cap {format_bytes(caps[pos])}"
        lines.append(f"  {pos} ({devices[pos]}): {table.describe_parts(parts)} ({cap})")
    fixes = []
    finite = [c for c in caps if c != float("inf")]
    if finite:
        for extra in range(1, len(costs) + 1):
            if auto.min_max_load(costs, caps + [max(finite)] * extra) is not None:
                fixes.append(f"{extra} more device(s) with {format_bytes(max(finite))} each")
                break
        limit = auto.min_max_load(costs, uncapped) or 0
        fixes.append(f"max_memory of at least {format_bytes(limit)} on every position")
    largest = max(chain, key=lambda u: u.cost)
    for path, _ in largest.units:
        module = root.get_submodule(path)
        name = type(module).__name__
        if name in user_no_split and largest.cost > min(caps):
            fixes.append(f"removing {name} from no_split ({path} alone needs {format_bytes(largest.cost)})")
    lines.append("Smallest changes that fit: " + "; or ".join(fixes) + ".")
    return "\n".join(lines)


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
    seen: dict[int, tuple[str, int, PlacedModule]] = {}
    for entry in entries:
        module = root.get_submodule(entry.path)
        for name, param in module.named_parameters(recurse=not entry.own_only, remove_duplicate=False):
            where = (join(entry.path, name), entry.position, entry)
            first = seen.setdefault(id(param), where)
            if first[1] != entry.position:
                together = _tie_together(root, entries, param, first[1])
                raise PlacementError(
                    f"{first[0]} and {where[0]} are the same (tied) parameter, placed on positions "
                    f"{first[1]} and {where[1]}. Tied parameters must live on one device, with every "
                    f"module holding them ({', '.join(_holders(root, entries, param))}): place "
                    f"{entry.path or '(root)'} on position {first[1]} (or {first[2].path or '(root)'} on "
                    f"{where[1]}), e.g. placement={together}; or use placement='auto', which keeps them "
                    "together."
                )


def _holders(root: nn.Module, entries: Sequence[PlacedModule], param: nn.Parameter) -> list[str]:
    """The paths of the modules that hold ``param`` as their own, in the placed entries."""
    return [
        join(entry.path, name.rpartition(".")[0]) if "." in name else entry.path or "(root)"
        for entry in entries
        for name, p in root.get_submodule(entry.path).named_parameters(
            recurse=not entry.own_only, remove_duplicate=False
        )
        if p is param
    ]


def _tie_together(
    root: nn.Module, entries: Sequence[PlacedModule], param: nn.Parameter, position: int
) -> dict[str, int]:
    """The user's map with every holder of ``param`` on ``position``. An entry whose own tensors do not
    include ``param`` (``decoder``, holding ``decoder.embed_tokens``) is replaced by its children, down to the
    holder, so the rest of it stays where it was placed; otherwise the whole entry moves."""
    together = {e.path: e.position for e in entries if not e.own_only}
    holders = _holders(root, entries, param)
    for entry in entries:
        inside = [h for h in holders if is_within(h, entry.path)]
        if entry.own_only or entry.position == position or not inside:
            continue
        del together[entry.path]
        together.update(_expand(root, entry.path, entry.position, inside, position))
    return together


def _expand(root: nn.Module, path: str, position: int, holders: list[str], target: int) -> dict[str, int]:
    """``path`` placed on ``position`` except ``holders`` (modules inside it) on ``target``: ``path`` split
    into its children where it holds no tensors of its own."""
    module = root.get_submodule(path)
    if path in holders or holds_tensors(module, recurse=False) or not any(module.children()):
        return {path: target}
    placed: dict[str, int] = {}
    for name, _ in module.named_children():
        child = join(path, name)
        inside = [h for h in holders if is_within(h, child)]
        placed.update(_expand(root, child, position, inside, target) if inside else {child: position})
    return placed
