"""ModelSplitStrategy: one process, one model, its submodules placed on several devices, optionally pipelined.

How it works: docs/internals.md, section ``lightning_gpupar/strategies/model_split.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.plugins.precision import Precision
from typing_extensions import override

from lightning_gpupar.checkpoint import CanonicalCheckpointMixin
from lightning_gpupar.model_split import ModelSplit, Placement, PlacementPlan, Recompute
from lightning_gpupar.strategies._single_process import SingleProcessStrategy
from lightning_gpupar.strategies.split_mixin import SplitStrategyMixin


class ModelSplitStrategy(CanonicalCheckpointMixin, SplitStrategyMixin, SingleProcessStrategy):
    """Train one model whose submodules live on different devices of the Trainer's device list.

    Args:
        placement: ``{"model.encoder": 0, "model.blocks.0-5": 1, ...}`` (submodule path or ModuleList
            range -> position in the Trainer's devices), ``"auto"`` (``None``): balance parameter and
            buffer bytes over the devices, one stage at a time, or ``"device_map"``: the ``hf_device_map``
            of the transformers model inside (its accelerate hooks are replaced by ours).
        chunks: micro-batches per batch; ``> 1`` pipelines the stage sequence (GPipe).
        stages: the ordered stage sequence for ``chunks > 1`` (ranges allowed). Default: the placement's
            keys in the order written, or for ``"auto"`` the inferred chain (see ``infer_stages``).
        default_device: position for parameters the placement map leaves out (default: an error).
        output_device: position where the model's outputs (and batches) land (default: last submodule's).
        max_memory: ``{position: "10GiB"}`` caps for ``"auto"``.
        no_split: class names ``"auto"`` must never split across devices.
        checkpoint: recompute activations in backward: ``"all"``, or a list of stage paths.
        parallel_devices: the devices, when they are not Lightning's ``devices=``: e.g. a CPU stage beside
            GPUs, ``[cuda:0, cuda:1, cpu]`` with ``Trainer(accelerator="gpu", devices=[0, 1])`` (the app:
            ``strategy.device_ids=[0,1,cpu]``). Under mixed precision each device type autocasts.
        deferred_batch_norm: with ``chunks > 1``, BatchNorm running statistics update once per step from
            all micro-batches, as in the unsplit model (default); ``False``: once per micro-batch.
        balance: what ``"auto"`` balances: ``"memory"`` (parameter and buffer bytes, the default) or
            ``"time"`` (each stage's measured forward + backward time on the LightningModule's
            ``example_input_array``, under the ``max_memory`` caps).
        trace: a path: record the pipeline's schedule for a few steps (Chrome trace, PNG timeline, bubble
            and utilisation printed); ``None`` (default): off.
        schedule: ``"gpipe"`` (default: every micro-batch's forward, then every backward) or ``"1f1b"``
            (PipeDream-Flush: ``training_step`` runs once per micro-batch and each micro-batch's backward
            starts once its forward left the last stage, so stage i holds at most K - i micro-batches'
            activations instead of all ``chunks``; see docs/pipeline-schedules.md).
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
        checkpoint: Recompute = None,
        deferred_batch_norm: bool = True,
        balance: str = "memory",
        trace: str | None = None,
        schedule: str = "gpipe",
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
        self.split = ModelSplit.from_options(locals())  # the split options of this signature

    @property
    def placement(self) -> Placement:
        return self.split.placement

    @property
    def chunks(self) -> int:
        return self.split.chunks

    # ------------------------------------------------------------------------------------ devices

    @property
    def devices(self) -> list[torch.device]:
        """The Trainer's devices: placement positions index this list."""
        return list(self.parallel_devices or [torch.device("cpu")])

    @property
    @override
    def split_devices(self) -> list[torch.device]:
        return self.devices

    @override
    def setup_environment(self) -> None:
        """Lightning's CUDA accelerator sets up the root device, which must be a GPU: with the output on a
        CPU stage beside GPUs, the first GPU of the split is set up instead (``Strategy.setup_environment``
        does nothing else)."""
        gpus = [d for d in self.split_devices if d.type == "cuda"]
        if isinstance(self.accelerator, CUDAAccelerator) and self.root_device.type == "cpu" and gpus:
            self.accelerator.setup_device(gpus[0])
            return
        super().setup_environment()

    def plan_for(self, module: torch.nn.Module) -> PlacementPlan:
        """The plan this strategy would apply to ``module`` (a LightningModule; may live on meta)."""
        return self.split.plan(module, self.devices)
