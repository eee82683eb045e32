"""How one model copy is split over a group of devices: the part ``model_split`` and ``ddp_split`` share.

:class:`ModelSplit` holds the user's choices (placement, micro-batches, stages...) and applies them to a
module and a device list: plan (nothing allocated), print, check free memory, place, pipeline. The
``model_split`` strategy applies it over all the Trainer's devices in one process; ``ddp_split`` applies
it in every DDP process over that process's own group of devices.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from lightning.fabric.utilities.init import _EmptyInit
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightning.pytorch.strategies import Strategy as _StrategyBase
else:
    _StrategyBase = object

from lightning_gpupar.pipeline import Checkpoint, Pipeline, PipelineHandle, install_pipeline
from lightning_gpupar.placement import (
    Placement,
    PlacementError,
    PlacementHandle,
    PlacementPlan,
    apply_placement,
    infer_stages,
    plan_placement,
)


@dataclass
class AppliedSplit:
    """A plan applied to a module; ``remove()`` takes its hooks and pipeline off again."""

    plan: PlacementPlan
    handles: list[PlacementHandle | PipelineHandle] = field(default_factory=list)

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

    See :class:`~lightning_gpupar.strategies.split.ModelSplitStrategy` for the meaning of each field;
    positions index the device list the split is applied to.
    """

    placement: Placement = "auto"
    chunks: int = 1
    stages: Sequence[str] | None = None
    default_device: int | None = None
    output_device: int | None = None
    max_memory: Mapping[Any, int | str] | None = None
    no_split: Sequence[str] = ()
    checkpoint: Checkpoint = None

    def __post_init__(self) -> None:
        if isinstance(self.chunks, bool) or not isinstance(self.chunks, int) or self.chunks < 1:
            raise PlacementError(f"chunks={self.chunks!r}: the number of micro-batches must be an int >= 1.")
        if not (self.placement is None or isinstance(self.placement, str | Mapping)):
            raise PlacementError(
                f"placement={self.placement!r}: write 'auto' or a map of submodule paths to device positions."
            )
        self.stages = list(self.stages) if self.stages is not None else None
        self.no_split = list(self.no_split or ())

    @property
    def is_auto(self) -> bool:
        return self.placement is None or self.placement == "auto"

    def positions_used(self) -> set[int]:
        """The positions a placement map names (empty for ``"auto"``), plus the declared defaults."""
        named = set() if self.is_auto else {int(v) for v in dict(self.placement).values()}  # type: ignore[arg-type]
        return named | {p for p in (self.default_device, self.output_device) if p is not None}

    def plan(self, module: nn.Module, devices: Sequence[torch.device]) -> PlacementPlan:
        """Where each submodule of ``module`` goes on ``devices``; computed without allocating."""
        stages = self.stages
        if stages is None and self.chunks > 1 and self.is_auto:
            stages = infer_stages(module, self.no_split)  # keep each stage whole for the pipeline
        return plan_placement(
            module,
            devices,
            self.placement,
            stages=stages if self.is_auto else None,
            default_device=self.default_device,
            output_device=self.output_device,
            max_memory=self.max_memory,
            no_split=self.no_split,
        )

    def pipeline_stages(self, module: nn.Module) -> list[str]:
        """The stage sequence ``chunks > 1`` pipelines: declared, the map's keys in order, or inferred."""
        if self.stages is not None:
            return list(self.stages)
        if isinstance(self.placement, Mapping):
            return [str(key) for key in self.placement]
        return infer_stages(module, self.no_split)

    def apply(self, module: nn.Module, devices: Sequence[torch.device], title: str) -> AppliedSplit:
        """Plan, print, check free memory, place; then pipeline the stage sequence if ``chunks > 1``."""
        plan = self.plan(module, devices)
        rank_zero_info(f"{title} placement (chunks={self.chunks}):\n{plan.table()}")
        plan.check_free_memory()
        applied = AppliedSplit(plan, [apply_placement(module, plan)])
        if "_device" in module.__dict__:  # LightningModule: `self.device` is where outputs and the loss live
            module.__dict__["_device"] = plan.output_device
        if self.chunks > 1:
            stages = self.pipeline_stages(module)
            applied.handles.append(install_pipeline(module, plan, stages, self.chunks, self.checkpoint))
        return applied

    def check_batch_size(self, batch_size: int | None) -> None:
        """Fail before the first step when the batches are smaller than ``chunks``."""
        if self.chunks > 1 and isinstance(batch_size, int) and batch_size < self.chunks:
            raise PlacementError(
                f"chunks={self.chunks} micro-batches, but the training batches hold {batch_size} samples "
                f"(per process). Use chunks <= {batch_size} or a larger batch size."
            )


def optimizer_state_to_parameter_devices(optimizer: Optimizer) -> None:
    """Move each parameter's optimizer state (but ``step`` counters) to that parameter's device."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                state[key] = value.to(param.device)


class SplitStrategyMixin(_StrategyBase):
    """The strategy side of a :class:`ModelSplit`, shared by ``model_split`` and ``ddp_split``: place and
    unplace the model, keep optimizer state with its parameters, check the batches against ``chunks``,
    and warn when a training step bypasses the pipeline."""

    split: ModelSplit
    applied: AppliedSplit | None = None
    _pipeline_use_checked: bool = False

    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        """The LightningModule's step; after the first one, warn if ``chunks > 1`` had no effect."""
        if self._pipeline_use_checked:
            return super().training_step(*args, **kwargs)
        pipeline = self.applied.pipeline if self.applied is not None else None
        calls = pipeline.calls if pipeline is not None else 0
        output = super().training_step(*args, **kwargs)
        if pipeline is not None:
            self._pipeline_use_checked = True
            if pipeline.calls == calls:
                rank_zero_warn(
                    f"chunks={self.split.chunks}, but the first training step never called the forward of "
                    f"{pipeline.owner_name}, so no batch was split into micro-batches: the pipeline only "
                    "replaces that forward, and a training_step that calls the stages itself runs them on "
                    "the whole batch. Call the owner (e.g. self.model(x)) in training_step, or use chunks=1.",
                    category=UserWarning,
                )
        return output

    # -- before placement (issue 15, suspicion 4): the output device, and no whole model on one GPU --------

    def _output_device_before_placement(self, devices: Sequence[torch.device]) -> torch.device:
        """Where the plan will put outputs, before it is applied: asked of the plan (sizes only, nothing
        moves) once the LightningModule is attached, so the first CUDA call (``setup_environment``'s
        ``set_device``) is on that device, not on the last one; the declared ``output_device`` position
        (else the last device) while no module exists or its layers are still to be built."""
        module = self.lightning_module
        if module is not None:
            try:
                return self.split.plan(module, devices).output_device
            except PlacementError:
                pass  # e.g. layers that configure_model builds later
        position = self.split.output_device
        return devices[min(position, len(devices) - 1) if position is not None else -1]

    @contextmanager
    def tensor_init_context(self, empty_init: bool | None = None) -> Iterator[None]:
        """``Trainer.init_module()`` and ``configure_model`` build the model on the CPU, not on
        ``root_device``: the whole model on one GPU is the OOM splitting exists to avoid; placement then
        moves each part to its device. (Only under a split; plain DDP keeps Lightning's.)"""
        if not getattr(self, "is_split", True):
            with super().tensor_init_context(empty_init):
                yield
            return
        with _EmptyInit(enabled=bool(empty_init)), self.precision_plugin.tensor_init_context():
            yield

    def _place(self, module: nn.Module, devices: Sequence[torch.device], title: str) -> AppliedSplit:
        self._unplace()
        self.applied = self.split.apply(module, devices, title)
        return self.applied

    def _unplace(self) -> None:
        if self.applied is not None:
            self.applied.remove()
            self.applied = None

    def _optimizer_state_to_parameters(self) -> None:
        """Undo Lightning's move of all optimizer state to ``root_device``."""
        for optimizer in self.optimizers:
            optimizer_state_to_parameter_devices(optimizer)

    def _load_optimizer_states(self, checkpoint: Mapping[str, Any]) -> None:
        """torch's ``Optimizer.load_state_dict`` already puts each state on its parameter's device."""
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)

    def _check_train_batches(self) -> None:
        """Fail before the first step if the training batches are smaller than ``chunks``."""
        module = self.lightning_module
        loader = module.trainer.train_dataloader if module is not None else None
        self.split.check_batch_size(getattr(loader, "batch_size", None))
