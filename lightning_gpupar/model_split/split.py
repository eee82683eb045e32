"""How one model copy is split over a group of devices: the part ``model_split`` and ``ddp_split`` share.

:class:`ModelSplit` holds the user's choices (placement, micro-batches, stages...) and applies them to a
module and a device list: plan (nothing allocated), print, check free memory, place, pipeline. The
``model_split`` strategy applies it over all the Trainer's devices in one process; ``ddp_split`` applies
it in every DDP process over that process's own group of devices.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn
from torch import nn

from lightning_gpupar.model_split.balance.by_time import RunPrecision, plan_by_time
from lightning_gpupar.model_split.device_map import DEVICE_MAP
from lightning_gpupar.model_split.errors import PipelineError, PlacementError
from lightning_gpupar.model_split.hooks import PlacementHandle, apply_placement
from lightning_gpupar.model_split.one_f_one_b import (
    StagedPipeline,
    check_schedule,
    install_staged,
    plan_for_schedule,
)
from lightning_gpupar.model_split.pipeline import (
    Pipeline,
    PipelineHandle,
    Recompute,
    install_pipeline,
    recomputed_stages,
)
from lightning_gpupar.model_split.plan import (
    Placement,
    PlacementPlan,
    cuda_free_bytes,
    infer_stages,
    parse_max_memory,
    plan_placement,
)

#: The placements named by a word: balanced by us, or read from the model's ``hf_device_map``.
PLACEMENTS = ("auto", DEVICE_MAP)
#: What ``placement="auto"`` balances: parameter and buffer bytes, or measured forward + backward times.
BALANCES = ("memory", "time")


@dataclass
class AppliedSplit:
    """A plan applied to a module; ``remove()`` takes its hooks and pipeline off again."""

    plan: PlacementPlan
    handles: list[PlacementHandle | PipelineHandle] = field(default_factory=list)
    staged: StagedPipeline | None = None  #: ``schedule="1f1b"``: the pipeline run one micro-batch at a time

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline installed for ``chunks > 1`` (``None`` for ``chunks=1``)."""
        found = [h.pipeline for h in self.handles if isinstance(h, PipelineHandle)]
        return found[0] if found else None

    def remove(self) -> None:
        for handle in reversed(self.handles):
            handle.remove()
        self.handles = []


@dataclass
class ModelSplit:
    """Placement map (or ``"auto"``), micro-batches and stage options for one model copy.

    See :class:`~lightning_gpupar.strategies.model_split.ModelSplitStrategy` for the meaning of each field;
    positions index the device list the split is applied to.
    """

    placement: Placement = "auto"
    chunks: int = 1
    stages: Sequence[str] | None = None
    default_device: int | None = None
    output_device: int | None = None
    max_memory: Mapping[Any, int | str] | None = None
    no_split: Sequence[str] = ()
    checkpoint: Recompute = None
    deferred_batch_norm: bool = True
    balance: str = "memory"
    trace: str | None = None
    schedule: str = "gpipe"

    @classmethod
    def option_names(cls) -> tuple[str, ...]:
        """The split options, in order: the one list the strategies, the Hydra schema and the YAML follow."""
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> ModelSplit:
        """A split from the entries of ``options`` that name split options (the others are not its own)."""
        return cls(**{name: options[name] for name in cls.option_names() if name in options})

    def __post_init__(self) -> None:
        check_schedule(self.schedule)
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise PlacementError(f"chunks={self.chunks!r}: the number of micro-batches must be an int >= 1.")
        placement = self.placement
        if not (placement is None or placement in PLACEMENTS or isinstance(placement, Mapping)):
            raise PlacementError(
                f"placement={placement!r}: write 'auto' or a map of submodule paths to device positions, or "
                "'device_map' (the model's hf_device_map)."
            )
        if self.balance not in BALANCES:
            raise PlacementError(
                f"balance={self.balance!r}: write one of {', '.join(map(repr, BALANCES))} (what "
                "placement='auto' balances over the devices: parameter bytes, or measured stage times)."
            )
        parse_max_memory(self.max_memory)  # keys and sizes fail here, before any Trainer exists
        self.stages = list(self.stages) if self.stages is not None else None
        if self.chunks > 1 and self.pipeline_stages_declared() == []:
            named = "stages=[]" if self.stages is not None else "placement={}"
            raise PipelineError(
                f"chunks={self.chunks} pipelines a sequence of stages, but {named} names none. Name the "
                "stages in the order the forward calls them (strategy.stages=[...] or the placement's "
                "keys), use placement='auto' (the stages are inferred), or chunks=1."
            )
        self.no_split = list(self.no_split or ())

    @property
    def is_auto(self) -> bool:
        return self.placement is None or self.placement == "auto"

    def positions_used(self) -> set[int]:
        """The positions a placement map names (empty for ``"auto"``), plus the declared defaults."""
        named = {int(v) for v in self.placement.values()} if isinstance(self.placement, Mapping) else set()
        return named | {p for p in (self.default_device, self.output_device) if p is not None}

    def plan(
        self,
        module: nn.Module,
        devices: Sequence[torch.device],
        optimizer: torch.optim.Optimizer | None = None,
        example_input: Any = None,
        precision: RunPrecision | None = None,
    ) -> PlacementPlan:
        """Where each submodule of ``module`` goes on ``devices``; computed without allocating (but for
        ``balance="time"``, which runs the stages). Activations count what the schedule holds: all ``chunks``
        micro-batches per stage (GPipe), or ``K - i`` (1F1B).

        ``optimizer`` and ``example_input`` make the training-memory estimate exact (see
        :func:`~lightning_gpupar.model_split.plan.plan_placement`); ``precision``: the run's, in which
        ``balance="time"`` times the stages of the already converted module."""
        stages = self.stages
        if stages is None and self.chunks > 1 and self.is_auto:
            stages = infer_stages(module, self.no_split)  # keep each stage whole for the pipeline
        if self.balance == "time" and self.is_auto:
            chain = stages if stages is not None else infer_stages(module, self.no_split)
            timed = plan_by_time(
                module,
                devices,
                chain,
                chunks=self.chunks,
                output_device=self.output_device,
                max_memory=self.max_memory,
                precision=precision,
            )
            return plan_for_schedule(timed, self.schedule, self.chunks)
        placed = plan_placement(
            module,
            devices,
            self.placement,
            stages=stages if self.is_auto else None,
            default_device=self.default_device,
            output_device=self.output_device,
            max_memory=self.max_memory,
            no_split=self.no_split,
            optimizer=optimizer,
            example_input=example_input,
        )
        return plan_for_schedule(placed, self.schedule, self.chunks)  # activations as the schedule holds them

    def pipeline_stages_declared(self) -> list[str] | None:
        """The stage sequence as declared (``stages``, else the map's keys in order); ``None``: inferred
        (or, for ``"device_map"``, read from the plan)."""
        if self.stages is not None:
            return list(self.stages)
        if isinstance(self.placement, Mapping):
            return [str(key) for key in self.placement]
        return None

    def pipeline_stages(self, module: nn.Module, plan: PlacementPlan | None = None) -> list[str]:
        """The stage sequence ``chunks > 1`` pipelines: declared, the map's keys in order, the device map's
        entries in execution order (from ``plan``), or inferred."""
        declared = self.pipeline_stages_declared()
        if declared is not None:
            return declared
        if self.placement == DEVICE_MAP and plan is not None:
            return [e.path for e in plan.entries if e.source == "map" and not e.own_only]
        return infer_stages(module, self.no_split)

    def apply(
        self,
        module: nn.Module,
        devices: Sequence[torch.device],
        title: str,
        plan: PlacementPlan | None = None,
        **planning: Any,
    ) -> AppliedSplit:
        """Plan (unless ``plan`` is given), print, check free memory, place; then pipeline the stage sequence
        if ``chunks > 1``. ``planning``: ``optimizer`` and ``example_input`` for :meth:`plan`."""
        plan = plan or self.plan(module, devices, **planning)
        rank_zero_info(f"{title} placement (chunks={self.chunks}):\n{plan.table(cuda_free_bytes)}")
        if self.chunks > 1 and self.is_auto and self.stages is None:
            rank_zero_info(
                f"placement='auto' with chunks={self.chunks} pipelines the chain units "
                f"{' -> '.join(self.pipeline_stages(module))}; the first step checks that the forward runs "
                "them as this chain (declare strategy.stages otherwise)."
            )
        plan.check_free_memory()
        applied = AppliedSplit(plan, [apply_placement(module, plan)])
        if "_device" in module.__dict__:  # LightningModule: `self.device` is where outputs and the loss live
            module.__dict__["_device"] = plan.output_device
        if self.trace and self.chunks == 1:
            rank_zero_warn(
                f"trace={self.trace!r} records the pipeline's schedule, but chunks=1 runs no pipeline: "
                "nothing is traced. Use chunks > 1, or torch.profiler for an unpipelined split.",
                category=UserWarning,
            )
        stages = self.pipeline_stages(module, plan)
        if self.chunks == 1 and recomputed_stages(module, stages, self.checkpoint):
            rank_zero_warn(  # the names are checked all the same: a typo fails now, not once chunks grows
                f"checkpoint={self.checkpoint!r} recomputes pipeline stages in backward, but chunks=1 runs "
                "no pipeline: it has no effect. Use chunks > 1, or torch.utils.checkpoint in the model.",
                category=UserWarning,
            )
        first = getattr(rank_zero_only, "rank", 0) == 0  # ddp_split: one process writes the trace
        trace = self.trace if first else None
        if self.chunks > 1:
            handle = install_pipeline(
                module, plan, stages, self.chunks, self.checkpoint, self.deferred_batch_norm, trace
            )
            applied.handles.append(handle)
            if self.schedule == "1f1b":
                applied.staged = install_staged(handle)
        return applied

    def check_batch_size(self, batch_size: int | None) -> None:
        """Fail before the first step when the batches are smaller than ``chunks``."""
        if self.chunks > 1 and isinstance(batch_size, int) and batch_size < self.chunks:
            raise PlacementError(
                f"chunks={self.chunks} micro-batches, but the training batches hold {batch_size} samples "
                f"(per process). Use chunks <= {batch_size} or a larger batch size."
            )
