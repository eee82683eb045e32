"""``placement="auto"``: walk the module tree into chain units, then partition them over the devices.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/balance/by_memory.py``.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from lightning_gpupar.errors import GpuparError
from lightning_gpupar.model_split.memory import MemoryParts, ModelMemory, charge
from lightning_gpupar.model_split.paths import holds_tensors, is_within, join

#: torch modules whose forward uses their children's weights directly, or adds residuals across children.
DEFAULT_NO_SPLIT = ("MultiheadAttention", "TransformerEncoderLayer", "TransformerDecoderLayer")

Unit = tuple[str, bool]  # (module path, own tensors only)


@dataclass(frozen=True)
class ChainUnit:
    """What a partition places: one or more units (several for a tied group), with their training memory."""

    units: tuple[Unit, ...]
    memory: MemoryParts

    @property
    def cost(self) -> int:
        return self.memory.total


#: Chain units in execution order, capacity per position (bytes, ``inf``: none) -> a position per unit,
#: non-decreasing. Raise :class:`NoFit` when the units cannot fit.
Partitioner = Callable[[Sequence[ChainUnit], Sequence[float]], list[int]]


class NoFit(GpuparError):
    """The chain units cannot be placed under the caps."""

    def __init__(self, chain: Sequence[ChainUnit] = ()) -> None:
        super().__init__()
        self.chain = list(chain)  # the finest chain units tried (for the message)


def model_no_split(root: nn.Module, no_split: Sequence[str]) -> set[str]:
    """The classes auto keeps whole: the user's, those the model's modules declare, and torch's defaults."""
    names = set(no_split) | set(DEFAULT_NO_SPLIT)
    for module in root.modules():
        declared = getattr(module, "_no_split_modules", None)
        if isinstance(declared, list | set | tuple):
            names |= {str(n) for n in declared}
    return names


def execution_order(root: nn.Module, memory: ModelMemory) -> dict[str, tuple[int, int]]:
    """A sort key per module path: its subtree's first call in the example forward, then registration."""
    registration = {path: i for i, (path, _) in enumerate(root.named_modules(remove_duplicate=False))}
    first: dict[str, int] = {}
    for path, index in memory.order.items():
        parts = path.split(".") if path else []
        for depth in range(len(parts) + 1):
            ancestor = ".".join(parts[:depth])
            first[ancestor] = min(first.get(ancestor, index), index)
    never = len(registration) + len(first)
    return {p: (first.get(p, never), r) for p, r in registration.items()}


def tie_holders(root: nn.Module) -> list[set[str]]:
    """The paths of the modules registering each parameter that more than one module registers."""
    holders: dict[int, set[str]] = {}
    for path, module in root.named_modules():
        for param in module.parameters(recurse=False):
            holders.setdefault(id(param), set()).add(path)
    return [paths for paths in holders.values() if len(paths) > 1]


def ties_outside(path: str, ties: Sequence[set[str]]) -> bool:
    """Whether a parameter in the subtree at ``path`` is also registered by a module outside it."""
    return any(
        any(is_within(p, path) for p in paths) and not all(is_within(p, path) for p in paths)
        for paths in ties
    )


def walk_units(root: nn.Module, memory: ModelMemory, caps: Sequence[float], no_split: set[str]) -> list[Unit]:
    """The units to place, in execution order: descend where a module exceeds the current device's share
    or holds a parameter tied to one outside it."""
    key = execution_order(root, memory)
    ties = tie_holders(root)
    n = len(caps)
    total = memory.parts("").total
    used = [0.0] * n
    pos, target = 0, total / n
    queue: deque[Unit] = deque([("", False)])
    units: list[Unit] = []
    while queue:
        path, own_only = queue.popleft()
        module = root.get_submodule(path)
        if not holds_tensors(module, recurse=not own_only):
            continue  # nothing to place: it runs where its input is
        cost = memory.parts(path, own_only).total
        fits = used[pos] + cost <= caps[pos]
        splittable = not own_only and _can_descend(path, module, no_split)
        if splittable and ties_outside(path, ties):
            queue.extendleft(reversed(_children(root, path, key)))
            continue
        if fits and (used[pos] + cost <= target or pos == n - 1):
            pass
        elif splittable:
            queue.extendleft(reversed(_children(root, path, key)))
            continue
        elif pos < n - 1 and not (fits and used[pos] + cost - target < target - used[pos]):
            pos += 1
            target = (total - sum(used)) / (n - pos)
            queue.appendleft((path, own_only))
            continue
        used[pos] += cost
        units.append((path, own_only))
    return units


def _children(root: nn.Module, path: str, key: dict[str, tuple[int, int]]) -> list[Unit]:
    """A module's units when it is split: its own tensors (if any), then its children in execution order."""
    module = root.get_submodule(path)
    children = [(join(path, name), False) for name, _ in module.named_children()]
    children.sort(key=lambda unit: key[unit[0]])
    return ([(path, True)] if holds_tensors(module, recurse=False) else []) + children


def search(
    root: nn.Module,
    units: list[Unit],
    memory: ModelMemory,
    caps: Sequence[float],
    no_split: set[str] | None,
    partition: Partitioner,
) -> tuple[list[ChainUnit], list[int]]:
    """Partition the chain units of ``units``; while that finds no fit, split the largest unit that may be
    split (never with ``no_split=None``: the units are fixed) and try again. Raise :class:`NoFit` with the
    finest chain tried."""
    key = execution_order(root, memory)
    while True:
        units = sorted(units, key=lambda u: (key[u[0]], not u[1]))
        chain = chain_units(root, units, memory)
        try:
            return chain, partition(chain, caps)
        except NoFit:
            pass
        splittable = [
            u
            for u in units
            if no_split is not None and not u[1] and _can_descend(u[0], root.get_submodule(u[0]), no_split)
        ]
        if not splittable:
            raise NoFit(chain)
        largest = max(splittable, key=lambda u: memory.parts(u[0]).total)
        units = [u for u in units if u != largest] + [
            c for c in _children(root, largest[0], key) if holds_tensors(root.get_submodule(c[0]), not c[1])
        ]


def _can_descend(path: str, module: nn.Module, no_split: set[str]) -> bool:
    """Whether the walk may place ``module``'s children apart: not kept whole, children hold tensors, and
    it has no tensors of its own (its forward may use them beside any child's output)."""
    if type(module).__name__ in no_split or not any(holds_tensors(c) for c in module.children()):
        return False
    return path == "" or not holds_tensors(module, recurse=False)


def chain_units(root: nn.Module, units: Sequence[Unit], memory: ModelMemory) -> list[ChainUnit]:
    """Merge units that share a parameter into one chain unit, at the place of its first member."""
    parts = charge(list(units), memory)
    owner: dict[int, int] = {}  # parameter id -> the first unit holding it
    group = list(range(len(units)))

    def find(i: int) -> int:
        while group[i] != i:
            group[i] = group[group[i]]
            i = group[i]
        return i

    for index, (path, own_only) in enumerate(units):
        module = root.get_submodule(path)
        for param in module.parameters(recurse=not own_only):
            first = owner.setdefault(id(param), index)
            a, b = find(first), find(index)
            if a != b:
                group[max(a, b)] = min(a, b)
    members: dict[int, list[int]] = {}
    for index in range(len(units)):
        members.setdefault(find(index), []).append(index)
    chain = []
    for head in sorted(members):
        indices = members[head]
        memory_sum = MemoryParts()
        for i in indices:
            memory_sum = memory_sum + parts[i]
        chain.append(ChainUnit(tuple(units[i] for i in indices), memory_sum))
    return chain


# --------------------------------------------------------------------------------------------- partition


def balance_memory(units: Sequence[ChainUnit], caps: Sequence[float]) -> list[int]:
    """Contiguous runs per device: the smallest possible largest device total under the caps, and among
    those partitions the one with the most even totals (least sum of squares)."""
    costs = [u.cost for u in units]
    limit = min_max_load(costs, caps)
    if limit is None:
        raise NoFit
    bounds = [min(c, limit) for c in caps]
    return _even_partition(costs, bounds)


def min_max_load(costs: Sequence[int], caps: Sequence[float]) -> float | None:
    """The least achievable largest device total of a contiguous partition under ``caps`` (or ``None``)."""
    if not _fits(costs, caps, float("inf")):
        return None
    prefix = [0, *itertools.accumulate(costs)]
    candidates = sorted(
        {prefix[j] - prefix[i] for i in range(len(costs)) for j in range(i + 1, len(costs) + 1)}
    )
    lo, hi = 0, len(candidates) - 1
    if not candidates:
        return 0
    while lo < hi:  # the smallest block total that is feasible as a limit
        mid = (lo + hi) // 2
        if _fits(costs, caps, candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def _fits(costs: Sequence[int], caps: Sequence[float], limit: float) -> bool:
    """Greedy fill in device order: feasible iff every unit lands (optimal for contiguous blocks)."""
    i = 0
    for cap in caps:
        room = min(cap, limit)
        load = 0
        while i < len(costs) and load + costs[i] <= room:
            load += costs[i]
            i += 1
    return i == len(costs)


def _even_partition(costs: Sequence[int], bounds: Sequence[float]) -> list[int]:
    """Dynamic programme: split ``costs`` into ``len(bounds)`` contiguous blocks (possibly empty), block j
    at most ``bounds[j]``, minimising the sum of squared block totals."""
    n, k = len(costs), len(bounds)
    prefix = [0]
    for cost in costs:
        prefix.append(prefix[-1] + cost)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for j in range(1, k + 1):
        for i in range(n + 1):
            for s in range(i, -1, -1):
                block = prefix[i] - prefix[s]
                if block > bounds[j - 1]:
                    break
                value = best[j - 1][s] + float(block) ** 2
                if value < best[j][i]:
                    best[j][i], cut[j][i] = value, s
    positions = [0] * n
    i = n
    for j in range(k, 0, -1):
        s = cut[j][i]
        for index in range(s, i):
            positions[index] = j - 1
        i = s
    return positions
