"""DDPStrategy: Lightning's DDP, with its options as plain config values and a Hydra-aware launcher.

The training path is Lightning's own: one process per device, each holding a full replica wrapped in
``torch.nn.parallel.DistributedDataParallel``, gradients all-reduced during ``backward``. What this
subclass changes is around it:

- DDP's options (``find_unused_parameters``, ``static_graph``, ``gradient_as_bucket_view``) and the
  process group's (``process_group_backend``, ``timeout`` in seconds) are keyword arguments a Hydra
  config can set.
- Processes started by Lightning (not by torchrun or SLURM) come from
  :class:`~lightning_gpupar.launchers.HydraAwareScriptLauncher`: each child runs the current Hydra
  job only, in that job's directory, so sweeps (``-m``) work.
- Layout mistakes (more processes than devices, a busy ``MASTER_PORT``, a GPU id this node lacks)
  fail before the process group is created, in words.
- Checkpoints hold canonical keys and are written atomically
  (:class:`~lightning_gpupar.checkpoint.CanonicalCheckpointMixin`).

Where a process's model goes and which devices DDP is told about are Lightning's two seams,
``model_to_device`` and ``determine_ddp_device_ids``; a multi-device-per-process variant overrides those.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from lightning_gpupar import signals
from lightning_gpupar.checkpoint import CanonicalCheckpointMixin
from lightning_gpupar.launchers import DDPLaunchError, HydraAwareScriptLauncher
from lightning_gpupar.model_split import ModelSplit, SplitStrategyMixin
from lightning_gpupar.pipeline import Checkpoint
from lightning_gpupar.placement import Placement

log = logging.getLogger(__name__)

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]

#: torch.distributed's default process-group timeout, in seconds.
DEFAULT_TIMEOUT_S = 1800.0


class DDPStrategy(CanonicalCheckpointMixin, SplitStrategyMixin, LightningDDPStrategy):
    """One process per device, Lightning's DDP underneath; construct it from a config or by hand.

    Args:
        find_unused_parameters: let DDP tolerate parameters that get no gradient in a step.
        static_graph: promise DDP the graph is the same every step (enables its optimisations).
        gradient_as_bucket_view: gradients alias DDP's communication buckets (saves memory).
        process_group_backend: ``"nccl"``, ``"gloo"``...; ``None`` picks by device (gloo on CPU).
        timeout: seconds a collective (and the rendezvous) may wait before every rank fails.
        start_method: ``"popen"`` re-runs the script per rank (Hydra-aware); others as in Lightning.
        devices_per_process: ``k > 1`` is ``ddp_split``: the D chosen devices form D/k groups, process r
            owns devices ``r*k .. r*k+k-1`` and holds one model copy split over them.
        placement, chunks, stages, default_device, output_device, max_memory, no_split, checkpoint:
            how each process splits its copy, as in
            :class:`~lightning_gpupar.strategies.split.ModelSplitStrategy`; positions count within the
            process's own group (0..k-1).
        **kwargs: any other argument of Lightning's ``DDPStrategy`` or of torch's
            ``DistributedDataParallel`` (``bucket_cap_mb``, ``ddp_comm_hook``, ``cluster_environment``...).
    """

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        process_group_backend: str | None = None,
        timeout: float | timedelta | None = DEFAULT_TIMEOUT_S,
        start_method: StartMethod = "popen",
        devices_per_process: int = 1,
        placement: Placement = "auto",
        chunks: int = 1,
        stages: Sequence[str] | None = None,
        default_device: int | None = None,
        output_device: int | None = None,
        max_memory: Mapping[Any, int | str] | None = None,
        no_split: Sequence[str] | None = None,
        checkpoint: Checkpoint = None,
        **kwargs: Any,
    ) -> None:
        if isinstance(timeout, int | float):
            timeout = timedelta(seconds=timeout)
        if isinstance(devices_per_process, bool) or not isinstance(devices_per_process, int):
            raise DDPLaunchError(f"devices_per_process={devices_per_process!r}: write an int >= 1.")
        if devices_per_process < 1:
            raise DDPLaunchError(
                f"devices_per_process={devices_per_process}: each process needs >= 1 device."
            )
        self.devices_per_process = devices_per_process
        self.split = ModelSplit(
            placement, chunks, stages, default_device, output_device, max_memory, no_split or (), checkpoint
        )
        self._all_devices: list[torch.device] | None = None
        self._check_group_positions()
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            **kwargs,
        )

    # -- ddp_split: one device group per process -------------------------------------------------------

    @property
    def is_split(self) -> bool:
        """Whether each process splits its model copy over a group of devices (``ddp_split``)."""
        return self.devices_per_process > 1

    @property
    def parallel_devices(self) -> list[torch.device] | None:
        """One device per process, as Lightning counts processes: the first device of each group."""
        if self._all_devices is None:
            return None
        return self._all_devices[:: self.devices_per_process]

    @parallel_devices.setter
    def parallel_devices(self, devices: list[torch.device] | None) -> None:
        k = self.devices_per_process
        if devices is not None and len(devices) % k:
            raise DDPLaunchError(
                f"devices_per_process={k}, but {len(devices)} device(s) were chosen "
                f"({', '.join(map(str, devices))}): the device count must be a multiple of {k}. Choose "
                f"{len(devices) - len(devices) % k or k} or {len(devices) + k - len(devices) % k} devices, "
                "or change strategy.devices_per_process."
            )
        self._all_devices = None if devices is None else list(devices)

    @property
    def device_group(self) -> list[torch.device]:
        """The devices this process owns: ``r*k .. r*k+k-1`` of the chosen list, for local rank r."""
        assert self._all_devices is not None, "the Trainer has not set the devices yet"
        k = self.devices_per_process
        return self._all_devices[self.local_rank * k : (self.local_rank + 1) * k]

    @property
    def root_device(self) -> torch.device:
        """Without a split, this rank's device; with one, its group's output device (batches, loss)."""
        if not self.is_split:
            return super().root_device
        if self.applied is not None:
            return self.applied.plan.output_device
        output = self.split.output_device
        return self.device_group[output if output is not None else -1]

    def model_to_device(self) -> None:
        """Split this process's model copy over its device group (``ddp_split``), else Lightning's move."""
        if not self.is_split:
            super().model_to_device()
            return
        assert self.model is not None
        applied = self._place(self.model, self.device_group, f"ddp_split rank {self.global_rank}")
        unused = sorted(set(range(self.devices_per_process)) - {e.position for e in applied.plan.entries})
        if unused:
            rank_zero_warn(
                f"ddp_split: the placement leaves device position(s) {unused} of each process's group "
                f"{[str(d) for d in self.device_group]} unused; they hold no part of the model."
            )

    def check_before_launch(
        self,
        function: Callable[..., Any],
        model: Any = None,
        loaders: Any = None,
        _val_loaders: Any = None,
        datamodule: Any = None,
        *_: Any,
    ) -> None:
        """ddp_split, in the launching process before any other starts: plan rank 0's placement (sizes
        only, nothing moves), so a missing submodule or an unplaceable map fails now; when fitting, check
        ``chunks`` against the per-process batch size of the training loader or the datamodule.

        The arguments are those the Trainer hands its launcher: ``_fit_impl(model, train_dataloaders,
        val_dataloaders, datamodule, ckpt_path)``.
        """
        if not self.is_split or not isinstance(model, torch.nn.Module) or self._all_devices is None:
            return
        self.split.plan(model, self._all_devices[: self.devices_per_process])
        if getattr(function, "__name__", "") == "_fit_impl":
            self.split.check_batch_size(_declared_batch_size(loaders, datamodule))

    def determine_ddp_device_ids(self) -> list[int] | None:
        """torch's DDP needs ``device_ids=None`` for a module spread over several devices."""
        return None if self.is_split else super().determine_ddp_device_ids()

    def setup(self, trainer: pl.Trainer) -> None:
        signals.install(trainer)  # SIGTERM reaches every rank and ends the run without a hang
        super().setup(trainer)
        if self.is_split and trainer.state.fn == TrainerFn.FITTING:
            self._optimizer_state_to_parameters()

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        if self.is_split:
            self._load_optimizer_states(checkpoint)
        else:
            super().load_optimizer_state_dict(checkpoint)

    def barrier(self, name: str | None = None) -> None:
        """Lightning's barrier, skipped once the run was interrupted (a signal, an error): a rank may be
        gone then, and rank 0 saves its on-exception checkpoint alone (the weights are the same on every
        rank)."""
        trainer = getattr(self._lightning_module, "_trainer", None)
        if trainer is not None and trainer.interrupted:
            return
        super().barrier(name)

    def on_train_start(self) -> None:
        super().on_train_start()
        self._check_train_batches()

    def teardown(self) -> None:
        self._unplace()
        super().teardown()

    def _check_group_positions(self) -> None:
        """Positions are relative to a process's group: one >= k would cross into another process."""
        k = self.devices_per_process
        if not self.is_split:
            if self.split.placement not in (None, "auto") or self.split.chunks > 1:
                raise DDPLaunchError(
                    "placement and chunks split a model over a process's devices, but devices_per_process=1. "
                    "Use strategy=ddp_split with devices_per_process >= 2, or strategy=split for one process."
                )
            return
        crossing = sorted(p for p in self.split.positions_used() if not 0 <= p < k)
        if crossing:
            raise DDPLaunchError(
                f"ddp_split with devices_per_process={k}: placement position(s) {crossing} lie outside a "
                f"process's own group. Positions count within the group, 0..{k - 1}; a stage on another "
                "process's device would cross process groups, which DDP cannot train."
            )

    def _configure_launcher(self) -> None:
        """Lightning's choice of launcher, with our Hydra-aware one in place of its script launcher."""
        if self._start_method != "popen":
            super()._configure_launcher()
            return
        assert self.cluster_environment is not None
        self._launcher = HydraAwareScriptLauncher(
            self.cluster_environment, self.num_processes, self.num_nodes, self._all_devices
        )

    def setup_environment(self) -> None:
        """Check this process's device exists on this node, then create the process group."""
        self._check_root_device()
        super().setup_environment()
        log.info(
            "DDP rank %d of %d on %s (node %d, local rank %d, %s backend)",
            self.global_rank,
            self.world_size,
            self.root_device,
            self.node_rank,
            self.local_rank,
            self.process_group_backend,
        )

    def _check_root_device(self) -> None:
        """Every device this process trains on (its whole group under ``ddp_split``) exists here."""
        devices = self.device_group if self.is_split else [self.root_device]
        cuda = {d: d.index for d in devices if d.type == "cuda" and d.index is not None}
        visible = torch.cuda.device_count() if cuda else 0
        missing = [d for d, index in cuda.items() if index >= visible]
        if missing:
            raise DDPLaunchError(
                f"Rank {self.global_rank} (node {self.node_rank}, local rank {self.local_rank}) should "
                f"train on {', '.join(map(str, missing))}, but this node sees {visible} GPU(s) "
                f"(ids 0..{visible - 1}). Every node needs the devices in strategy.device_ids; choose ids "
                "that exist on all nodes."
            )


def _declared_batch_size(loaders: Any, datamodule: Any) -> int | None:
    """The training batch size known without building a loader: the loader's ``batch_size``, or the
    datamodule's ``batch_size`` attribute or hyperparameter (where Lightning's batch-size finder looks)."""
    if isinstance(loaders, pl.LightningDataModule):  # fit(model, datamodule) passed positionally
        loaders, datamodule = None, loaders
    if loaders is not None:
        return getattr(loaders, "batch_size", None)
    if datamodule is None:
        return None
    if hasattr(datamodule, "batch_size"):
        return getattr(datamodule, "batch_size", None)
    hparams = getattr(datamodule, "hparams", {})
    return hparams.get("batch_size") if isinstance(hparams, Mapping) else None
