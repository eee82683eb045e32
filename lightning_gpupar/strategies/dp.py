"""``strategy="dp"``: one process, the batch split over the chosen devices, a replica per device.

How it works: docs/internals.md, section ``lightning_gpupar/strategies/dp.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import Accelerator
from lightning.pytorch.plugins.layer_sync import LayerSync
from lightning.pytorch.plugins.precision import Precision
from typing_extensions import override

from lightning_gpupar.checkpoint import CanonicalCheckpointMixin
from lightning_gpupar.dp.batch import split_batch, split_call
from lightning_gpupar.dp.gather import gather_outputs
from lightning_gpupar.dp.parallel_apply import StopIterationAsError, on_device, run_parallel
from lightning_gpupar.dp.replica_results import (
    LogRecorder,
    logged_metric_ids,
    merge_metrics,
    metric_pairs,
    replay_logs,
)
from lightning_gpupar.dp.replicate import replicate
from lightning_gpupar.strategies._single_process import SingleProcessStrategy

DeviceLike = torch.device | str | int


class DataParallelStrategy(CanonicalCheckpointMixin, SingleProcessStrategy):
    """Data parallelism in one process over ``parallel_devices`` (the Trainer's ``devices``).

    Checkpoints hold canonical keys and are written atomically (:class:`CanonicalCheckpointMixin`).

    Args:
        output_device: where outputs are gathered and the loss is reduced; one of the chosen devices
            (a ``torch.device``, ``"cuda:3"``, or a CUDA index). Default: the first device.
    """

    strategy_name = "dp"

    def __init__(
        self,
        accelerator: Accelerator | None = None,
        parallel_devices: list[torch.device] | None = None,
        output_device: DeviceLike | None = None,
        checkpoint_io: CheckpointIO | None = None,
        precision_plugin: Precision | None = None,
    ) -> None:
        super().__init__(
            accelerator=accelerator,
            parallel_devices=parallel_devices,
            cluster_environment=None,
            checkpoint_io=checkpoint_io,
            precision_plugin=precision_plugin,
        )
        self._output_device = output_device
        if output_device is not None:
            as_device(output_device)  # a misspelt device fails here, not at the first step

    # -- devices --------------------------------------------------------------------------------------

    @property
    def devices(self) -> list[torch.device]:
        assert self.parallel_devices, "DataParallelStrategy has no devices before the Trainer sets them"
        return self.parallel_devices

    @property
    @override
    def root_device(self) -> torch.device:
        """Where the module's parameters live: the first chosen device."""
        return self.devices[0]

    @property
    def output_device(self) -> torch.device:
        """Where outputs are gathered and the loss is reduced."""
        if self._output_device is None:
            return self.root_device
        wanted = self._output_device
        device = as_device(wanted)
        if device not in self.devices:
            raise ValueError(
                f"DataParallelStrategy(output_device={wanted!r}): {device} is not one of the chosen devices "
                f"{[str(d) for d in self.devices]}. Pick one of them, or leave output_device unset for the "
                "first."
            )
        return device

    @property
    @override
    def _layer_sync(self) -> LayerSync | None:
        return None

    @_layer_sync.setter
    def _layer_sync(self, layer_sync: LayerSync | None) -> None:
        if layer_sync is not None:
            raise ValueError(
                "Trainer(sync_batchnorm=True) cannot be combined with strategy='dp': all replicas live in "
                "one process and see a shard each, and BatchNorm keeps the first replica's statistics. Use "
                "strategy='ddp' (one process per device) for synchronised BatchNorm, or drop sync_batchnorm."
            )

    @override
    def setup_environment(self) -> None:
        _ = self.output_device  # validate before training starts
        super().setup_environment()

    @override
    def model_to_device(self) -> None:
        assert self.model is not None
        self.model.to(self.root_device)

    @override
    def batch_to_device(self, batch: Any, device: torch.device | None = None, dataloader_idx: int = 0) -> Any:
        """With several devices the batch stays where it is: each shard moves to its own device later."""
        if len(self.devices) == 1 or device is not None:
            return super().batch_to_device(batch, device, dataloader_idx)
        return batch

    # -- steps ----------------------------------------------------------------------------------------

    @override
    def training_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.train_step_context():
            module = self._module
            if not module.automatic_optimization and len(self.devices) > 1:
                return self._manual_optimization_step(*args, **kwargs)
            return self._parallel_step("training_step", *args, **kwargs)

    @override
    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.val_step_context():
            return self._parallel_step("validation_step", *args, **kwargs)

    @override
    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.test_step_context():
            return self._parallel_step("test_step", *args, **kwargs)

    @override
    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        with self.precision_plugin.predict_step_context():
            return self._parallel_step("predict_step", *args, **kwargs)

    @property
    def _module(self) -> LightningModule:
        module = self.lightning_module
        assert module is not None
        return module

    def _parallel_step(self, step_name: str, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """Split -> replicate -> transfer on each replica -> per-replica step -> merge results -> gather."""
        root = self._module
        if len(self.devices) == 1:
            return getattr(root, step_name)(batch, *args, **kwargs)

        shards, sizes = split_batch(batch, len(self.devices))
        devices = self.devices[: len(shards)]
        dataloader_idx = kwargs.get("dataloader_idx", args[1] if len(args) > 1 else 0)
        replicas = replicate(root, devices)
        shards = [
            _transfer_shard(root, replica, i, s, d, dataloader_idx)
            for i, (replica, s, d) in enumerate(zip(replicas, shards, devices, strict=True))
        ]

        recorders = [LogRecorder() for _ in replicas]
        for replica, recorder in zip(replicas, recorders, strict=True):
            replica.__dict__["log"] = recorder
        steps: list[Callable[[], Any]] = [
            partial(getattr(replica, step_name), shard, *args, **kwargs)
            for replica, shard in zip(replicas, shards, strict=True)
        ]
        outputs = run_parallel(steps, devices)

        pairs = metric_pairs(root, replicas)
        merge_metrics(pairs, logged_metric_ids(recorders))
        replay_logs(root, recorders, sizes, pairs, self.output_device)
        return gather_outputs(outputs, sizes, self.output_device)

    def _manual_optimization_step(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        """The user's step runs once on the full batch (on ``output_device``); only ``self(...)`` inside it
        runs data-parallel, direct submodule calls run on the root device (module docstring)."""
        root = self._module
        batch = root._apply_batch_transfer_handler(batch, self.output_device, 0)
        with self._parallel_forward(root):
            return root.training_step(batch, *args, **kwargs)

    @contextmanager
    def _parallel_forward(self, root: LightningModule) -> Iterator[None]:
        def forward(*inputs: Any, **kw: Any) -> Any:
            shards, sizes = split_call(inputs, kw, len(self.devices))
            devices = self.devices[: len(shards)]
            replicas = replicate(root, devices)
            for replica in replicas:
                del replica.__dict__["forward"]  # the class's forward, not this one
            calls = [
                partial(_call_on_device, replica, shard, device)
                for replica, shard, device in zip(replicas, shards, devices, strict=True)
            ]
            return gather_outputs(run_parallel(calls, devices), sizes, self.output_device)

        root.__dict__["forward"] = forward
        try:
            yield
        finally:
            del root.__dict__["forward"]


def _transfer_shard(
    root: LightningModule,
    replica: LightningModule,
    index: int,
    shard: Any,
    device: torch.device,
    dataloader_idx: int,
) -> Any:
    """Lightning's ``_apply_batch_transfer_handler`` for one shard, run on the shard's device: with
    ``device`` current, and the LightningModule's hooks called on the shard's replica, whose
    ``self.device``, parameters and buffers are on ``device`` (on the root, ``x - self.mean`` would mix
    devices). A datamodule's hooks are the datamodule's, as in Lightning."""
    trainer = root._trainer
    selector = trainer._data_connector._datahook_selector if trainer is not None else None

    def hook(name: str) -> Callable[..., Any]:
        owner = selector.get_instance(name) if selector is not None else root
        return getattr(replica if isinstance(owner, LightningModule) else owner, name)

    with on_device(device):
        with StopIterationAsError(f"transfer_batch_to_device for data-parallel replica {index} on {device}"):
            shard = hook("transfer_batch_to_device")(shard, device, dataloader_idx)
        with StopIterationAsError(f"on_after_batch_transfer for data-parallel replica {index} on {device}"):
            return hook("on_after_batch_transfer")(shard, dataloader_idx)


def _call_on_device(
    module: LightningModule, shard: tuple[tuple[Any, ...], dict[str, Any]], device: torch.device
) -> Any:
    inputs, kwargs = move_data_to_device(shard, device)
    return module(*inputs, **kwargs)


def as_device(wanted: DeviceLike) -> torch.device:
    """An ``output_device`` as a ``torch.device``: a CUDA index, ``"cuda:3"``, ``"cpu"`` or a device."""
    if isinstance(wanted, bool) or (isinstance(wanted, int) and wanted < 0):
        raise ValueError(
            f"output_device={wanted!r} (strategy.output_device) is not a device: write a CUDA index >= 0, "
            "'cuda:N' or 'cpu' (one of the chosen devices), or null for the first chosen device."
        )
    if isinstance(wanted, int):
        return torch.device("cuda", wanted)
    try:
        return torch.device(wanted)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"output_device={wanted!r} (strategy.output_device) is not a device: write a CUDA index "
            "(3), 'cuda:3' or 'cpu' (one of the chosen devices), or null for the first chosen device."
        ) from None
