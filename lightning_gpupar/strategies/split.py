"""ModelSplitStrategy: one process, one model, its submodules placed on several devices, optionally pipelined.

The path a step takes:

1. ``setup`` -> :meth:`ModelSplitStrategy.model_to_device`: the placement is planned from the module tree
   (nothing allocated), printed as a table, checked against each GPU's free memory, then applied: every
   placed submodule moves to its device and gets a hook that moves its inputs there.
2. With ``chunks > 1`` the stage sequence's owner (e.g. ``model``) runs a GPipe schedule over
   micro-batches (:mod:`lightning_gpupar.pipeline`); its outputs are concatenated.
3. The batch arrives on ``root_device`` = the *output device* (by default the device of the last placed
   submodule), where the model's output lands; so labels, the loss, metrics and ``self.device`` inside the
   LightningModule all live on that one device. Backward crosses devices through autograd.
4. Optimizer state stays with its parameters (Lightning would move it to ``root_device``).
   Gradient clipping by norm uses ``torch.nn.utils.clip_grad_norm_``, which computes per-device norms and
   combines them, so the total norm is that of the unsplit model.
5. Checkpoints hold the plain ``LightningModule.state_dict()`` keys: a split checkpoint loads into the
   unsplit model and under any other placement.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.types import ReduceOp
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import ParallelStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor
from torch.optim import Optimizer
from typing_extensions import override

from lightning_gpupar.checkpoint import CanonicalCheckpointMixin
from lightning_gpupar.pipeline import Checkpoint, PipelineHandle, install_pipeline
from lightning_gpupar.placement import (
    Placement,
    PlacementError,
    PlacementHandle,
    PlacementPlan,
    apply_placement,
    infer_stages,
    plan_placement,
)

log = logging.getLogger(__name__)


class ModelSplitStrategy(CanonicalCheckpointMixin, ParallelStrategy):
    """Train one model whose submodules live on different devices of the Trainer's device list.

    Args:
        placement: ``{"model.encoder": 0, "model.blocks.0-5": 1, ...}`` (submodule path or ModuleList
            range -> position in the Trainer's devices), or ``"auto"`` (``None``): balance parameter and
            buffer bytes over the devices, one stage at a time.
        chunks: micro-batches per batch; ``> 1`` pipelines the stage sequence (GPipe).
        stages: the ordered stage sequence for ``chunks > 1`` (ranges allowed). Default: the placement's
            keys in the order written, or for ``"auto"`` the inferred chain (see ``infer_stages``).
        default_device: position for parameters the placement map leaves out (default: an error).
        output_device: position where the model's outputs (and batches) land (default: last submodule's).
        max_memory: ``{position: "10GiB"}`` caps for ``"auto"``.
        no_split: class names ``"auto"`` must never split across devices.
        checkpoint: recompute activations in backward: ``"all"``, or a list of stage paths.
    """

    strategy_name = "model_split"

    def __init__(
        self,
        placement: Placement = "auto",
        chunks: int = 1,
        *,
        stages: Sequence[str] | None = None,
        default_device: int | None = None,
        output_device: int | None = None,
        max_memory: Mapping[Any, int | str] | None = None,
        no_split: Sequence[str] | None = None,
        checkpoint: Checkpoint = None,
        accelerator: pl.accelerators.Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        checkpoint_io: Any = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        if isinstance(chunks, bool) or not isinstance(chunks, int) or chunks < 1:
            raise PlacementError(f"chunks={chunks!r}: the number of micro-batches must be an int >= 1.")
        if not (placement is None or isinstance(placement, str | Mapping)):
            raise PlacementError(
                f"placement={placement!r}: write 'auto' or a map of submodule paths to device positions."
            )
        self.placement = placement
        self.chunks = chunks
        self.stages = list(stages) if stages is not None else None
        self.default_device = default_device
        self.output_device = output_device
        self.max_memory = max_memory
        self.no_split = list(no_split or ())
        self.checkpoint = checkpoint
        self.plan: PlacementPlan | None = None
        self._handles: list[PlacementHandle | PipelineHandle] = []

    # ------------------------------------------------------------------------------------ devices

    @property
    def devices(self) -> list[torch.device]:
        """The Trainer's devices: placement positions index this list."""
        return list(self.parallel_devices or [torch.device("cpu")])

    @property
    @override
    def root_device(self) -> torch.device:
        """The output device: where batches arrive and outputs, loss and metrics live."""
        if self.plan is not None:
            return self.plan.output_device
        position = self.output_device if self.output_device is not None else len(self.devices) - 1
        return self.devices[min(position, len(self.devices) - 1)]

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}  # one process sees every sample

    # -------------------------------------------------------------------------------- placement

    def plan_for(self, module: torch.nn.Module) -> PlacementPlan:
        """The plan this strategy would apply to ``module`` (a LightningModule; may live on meta)."""
        stages = self.stages
        if stages is None and self.chunks > 1 and self.placement in (None, "auto"):
            stages = infer_stages(module, self.no_split)  # keep each stage whole for the pipeline
        return plan_placement(
            module,
            self.devices,
            self.placement,
            stages=stages if self.placement in (None, "auto") else None,
            default_device=self.default_device,
            output_device=self.output_device,
            max_memory=self.max_memory,
            no_split=self.no_split,
        )

    def pipeline_stages(self, module: torch.nn.Module) -> list[str]:
        """The stage sequence ``chunks > 1`` pipelines: declared, the map's keys in order, or inferred."""
        if self.stages is not None:
            return self.stages
        if isinstance(self.placement, Mapping):
            return [str(key) for key in self.placement]
        return infer_stages(module, self.no_split)

    @override
    def model_to_device(self) -> None:
        """Plan, print, check free memory, place; then pipeline the stage sequence if ``chunks > 1``."""
        module = self.lightning_module
        assert module is not None
        self._remove_handles()
        plan = self.plan_for(module)
        rank_zero_info(f"ModelSplitStrategy placement (chunks={self.chunks}):\n{plan.table()}")
        plan.check_free_memory()
        self._handles.append(apply_placement(module, plan))
        self.plan = plan
        module._device = plan.output_device  # `self.device` in the LightningModule: the output device
        if self.chunks > 1:
            stages = self.pipeline_stages(module)
            self._handles.append(install_pipeline(module, plan, stages, self.chunks, self.checkpoint))

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        super().setup(trainer)
        if trainer.state.fn == TrainerFn.FITTING:
            for optimizer in self.optimizers:
                _state_to_parameter_devices(optimizer)

    @override
    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        """torch's ``Optimizer.load_state_dict`` already puts each state on its parameter's device."""
        for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"], strict=True):
            optimizer.load_state_dict(state)

    @override
    def on_train_start(self) -> None:
        """Fail before the first step if the batches are smaller than ``chunks``."""
        module = self.lightning_module
        loader = module.trainer.train_dataloader if module is not None else None
        batch_size = getattr(loader, "batch_size", None)
        if self.chunks > 1 and isinstance(batch_size, int) and batch_size < self.chunks:
            raise PlacementError(
                f"chunks={self.chunks} micro-batches, but the training batches hold {batch_size} samples. "
                f"Use chunks <= {batch_size} or a larger batch size."
            )

    @override
    def teardown(self) -> None:
        self._remove_handles()
        self.plan = None
        super().teardown()

    def _remove_handles(self) -> None:
        for handle in reversed(self._handles):
            handle.remove()
        self._handles = []

    # ------------------------------------------------------------------- one process: no collectives

    @override
    def reduce(
        self, tensor: Tensor | Any, group: Any | None = None, reduce_op: ReduceOp | str | None = "mean"
    ) -> Tensor | Any:
        return tensor

    @override
    def barrier(self, name: str | None = None) -> None:
        pass

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj


def _state_to_parameter_devices(optimizer: Optimizer) -> None:
    """Move each parameter's optimizer state (but ``step`` counters) to that parameter's device."""
    for param, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, Tensor) and key != "step":
                state[key] = value.to(param.device)
