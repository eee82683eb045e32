"""Hand a plan from the launching process to the ranks it starts, so that every rank places identically.

Under ``ddp_split`` each rank splits its own copy of the model. Planned in every rank, ``"auto"`` could
differ between ranks (a model built differently, an optimizer that depends on the rank), and DDP would
then train mismatched copies. The launching process plans once (:func:`plan_to_json`) and passes the plan
in :data:`PLAN_ENV`; each rank rebuilds it for its own group (:func:`plan_from_json`: positions count within
the group, so the same plan shifts to each group's devices). Where no launcher hands one down (torchrun,
SLURM), the ranks compare their plans (:func:`check_same_plan`); a rank's own ``hf_device_map`` must agree
with the handed plan (:func:`check_device_map_agrees`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_gpupar.model_split.device_map import device_map_placement
from lightning_gpupar.model_split.errors import PlacementError
from lightning_gpupar.model_split.paths import find_submodule, uncovered
from lightning_gpupar.model_split.plan import PlacedModule, PlacementPlan, plan_placement

#: The environment variable that carries the launching process's plan to the ranks it starts.
PLAN_ENV = "LIGHTNING_GPUPAR_SPLIT_PLAN"


def plan_to_json(plan: PlacementPlan) -> str:
    """The plan's placement (paths, positions, own-tensor entries, output position) as one JSON line."""
    entries = [[e.path, e.position, e.own_only] for e in plan.entries]
    return json.dumps({"entries": entries, "output": plan.output_position}, separators=(",", ":"))


def plan_from_json(
    root: nn.Module, devices: Sequence[torch.device], text: str, **planning: Any
) -> PlacementPlan:
    """Rebuild a plan made by :func:`plan_to_json` for ``root`` on ``devices`` (this rank's group).

    ``planning``: ``optimizer``, ``example_input``, ``max_memory`` for the memory the table shows.
    """
    try:
        spec = json.loads(text)
        rows = [(str(p), int(pos), bool(own)) for p, pos, own in spec["entries"]]
        output = int(spec["output"])
    except (ValueError, KeyError, TypeError) as err:
        raise PlacementError(f"{PLAN_ENV} does not hold a plan ({err}): {text[:200]!r}") from None
    for path, _, _ in rows:
        try:
            find_submodule(root, path)
        except PlacementError as err:
            raise PlacementError(
                f"The plan the launching process handed down ({PLAN_ENV}) places {path!r}, which this rank's "
                f"model lacks: every rank must build the same model. {err}"
            ) from None
    whole = {path for path, _, own in rows if not own}
    own = {path for path, _, own_only in rows if own_only}
    missing = [p for p, is_own in uncovered(root, whole) if not (is_own and p in own)]
    if missing:
        raise PlacementError(
            f"The plan the launching process handed down ({PLAN_ENV}) leaves {missing} of this rank's model "
            "unplaced: every rank must build the same model."
        )
    placement = {path: pos for path, pos, own_only in rows if not own_only}
    plan = plan_placement(root, devices, placement, default_device=0, output_device=output, **planning)
    positions = {(path, True): pos for path, pos, own_only in rows if own_only}
    entries = tuple(
        _reposition(e, positions[(e.path, True)]) if (e.path, True) in positions else e for e in plan.entries
    )
    return dataclasses.replace(plan, entries=entries, output_position=output)


def check_device_map_agrees(root: nn.Module, devices: Sequence[torch.device], plan: PlacementPlan) -> None:
    """Refuse a rank whose own ``hf_device_map`` (read on its group ``devices``) places an entry elsewhere
    than the handed ``plan``: the rank would silently train by another map than its model carries."""
    try:
        own = device_map_placement(root, devices)
    except PlacementError as err:
        raise PlacementError(
            f"{err} (this rank's model; under ddp_split each process maps its copy over its own group "
            f"{[str(d) for d in devices]})"
        ) from None
    differ = {
        path: (pos, plan.position_of(path)) for path, pos in own.items() if plan.position_of(path) != pos
    }
    if differ:
        listing = ", ".join(f"{p!r}: {mine} here, {there} handed" for p, (mine, there) in differ.items())
        raise PlacementError(
            f"placement='device_map': this rank's hf_device_map differs from the plan the launching process "
            f"handed down ({PLAN_ENV}) at {listing} (positions in the process's group). Every process must "
            "map its model the same way within its group: build the same device map in each."
        )


def _reposition(entry: PlacedModule, position: int) -> PlacedModule:
    return PlacedModule(
        entry.path, position, entry.own_only, entry.num_params, entry.num_bytes, "auto", entry.memory
    )


def check_same_plan(plan: PlacementPlan, rank: int, gather: Callable[[str], list[str]]) -> None:
    """Fail on every rank when the ranks' plans differ; ``gather`` collects one string from each rank."""
    mine = plan_to_json(plan)
    every = gather(mine)
    differ = [r for r, other in enumerate(every) if other != every[0]]
    if differ:
        raise PlacementError(
            f"The ranks planned different placements (ranks {differ} differ from rank 0; this is rank "
            f"{rank}): every rank must build the same model with the same options. Rank 0: {every[0]}; "
            f"rank {differ[0]}: {every[differ[0]]}."
        )


def all_gather_strings(value: str) -> list[str]:
    """``value`` from every rank of the default process group (one string each)."""
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return [str(v) for v in gathered]
