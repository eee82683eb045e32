"""DDPSplitStrategy (``strategy="ddp_split"``): DDP where each process owns a group of devices holding one
split copy of the model.

How it works: docs/internals.md, section ``lightning_gpupar/strategies/ddp_split.py``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.distributed import _distributed_is_initialized, _init_dist_connection
from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from typing_extensions import override

from lightning_gpupar.ddp.launcher import DDPLaunchError
from lightning_gpupar.model_split import ModelSplit, PlacementPlan
from lightning_gpupar.model_split.device_map import DEVICE_MAP
from lightning_gpupar.model_split.handoff import (
    PLAN_ENV,
    all_gather_strings,
    check_device_map_agrees,
    check_same_plan,
    plan_from_json,
    plan_to_json,
)
from lightning_gpupar.strategies.ddp import DDPStrategy
from lightning_gpupar.strategies.split_mixin import (
    FitPlan,
    SplitStrategyMixin,
    module_signature,
    planning_inputs,
)
from lightning_gpupar.strategies.split_schedule import all_reduce_gradients


class DDPSplitStrategy(SplitStrategyMixin, DDPStrategy):
    """DDP over device groups: each process holds one model copy split over ``devices_per_process`` devices.

    Args:
        devices_per_process: k >= 2 devices per process; the chosen device count must be a multiple of k.
        **options: the split options (:meth:`ModelSplit.option_names`: ``placement``, ``chunks``...), as in
            :class:`~lightning_gpupar.strategies.model_split.ModelSplitStrategy`, positions counting within
            the process's own group (0..k-1); every other option is DDP's (``find_unused_parameters``,
            ``timeout``, ``process_group_backend``...), as in
            :class:`~lightning_gpupar.strategies.ddp.DDPStrategy`.
    """

    strategy_name = "ddp_split"

    def __init__(
        self,
        *,
        devices_per_process: int = 2,
        **options: Any,
    ) -> None:
        if isinstance(devices_per_process, bool) or not isinstance(devices_per_process, int):
            raise DDPLaunchError(f"devices_per_process={devices_per_process!r}: write an int >= 2.")
        if devices_per_process < 2:
            raise DDPLaunchError(
                f"DDPSplitStrategy(devices_per_process={devices_per_process}): each process splits its model "
                "over >= 2 devices. Use strategy=ddp (DDPStrategy) for one device per process."
            )
        self.split = ModelSplit.from_options(options)
        self._all_devices: list[torch.device] | None = None
        self._check_group_positions(devices_per_process)
        self.devices_per_process = devices_per_process
        super().__init__(
            **{key: value for key, value in options.items() if key not in ModelSplit.option_names()}
        )

    # -- devices: Lightning counts processes, each process owns a group ---------------------------------

    @property
    @override
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
    @override
    def node_devices(self) -> list[torch.device] | None:
        return self._all_devices

    @property
    def device_group(self) -> list[torch.device]:
        """The devices this process owns: ``r*k .. r*k+k-1`` of the chosen list, for local rank r."""
        assert self._all_devices is not None, "the Trainer has not set the devices yet"
        k = self.devices_per_process
        return self._all_devices[self.local_rank * k : (self.local_rank + 1) * k]

    @property
    @override
    def split_devices(self) -> list[torch.device]:
        return self.device_group

    @property
    @override
    def split_title(self) -> str:
        return f"ddp_split rank {self.global_rank}"

    @property
    @override
    def process_devices(self) -> list[torch.device]:
        return self.device_group

    # -- the path of a run ------------------------------------------------------------------------------

    def check_before_launch(
        self,
        function: Callable[..., Any],
        model: Any = None,
        loaders: Any = None,
        _val_loaders: Any = None,
        datamodule: Any = None,
        *_: Any,
    ) -> None:
        """In the launching process before any other starts: plan rank 0's placement (sizes only, nothing
        moves), so a missing submodule or an unplaceable map fails now, and hand the plan to the ranks
        (:data:`~lightning_gpupar.model_split.handoff.PLAN_ENV`; rank 0 in this process keeps it as its
        plan of the fit); when fitting, check ``chunks`` against the
        per-process batch size of the training loader or the datamodule.

        The arguments are those the Trainer hands its launcher: ``_fit_impl(model, train_dataloaders,
        val_dataloaders, datamodule, ckpt_path)``.
        """
        if not isinstance(model, torch.nn.Module) or self._all_devices is None:
            return
        group = self._all_devices[: self.devices_per_process]
        inputs = planning_inputs(model)
        plan = self.split.plan(model, group, **inputs)
        if getattr(function, "__name__", "") == "_fit_impl":
            self.split.check_batch_size(_declared_batch_size(loaders, datamodule))
        # only a launch that goes ahead hands its plan on: a refused one leaves no plan for a later fit
        os.environ[PLAN_ENV] = plan_to_json(plan)  # the ranks this process starts place by this plan
        # when this process goes on as rank 0, this is its plan for the fit (see SplitStrategyMixin.planned)
        key = (id(model), tuple(group), module_signature(model))
        self.fit_plan = FitPlan(key, plan, final="optimizer" in inputs)

    @override
    def compute_plan(
        self, module: torch.nn.Module, devices: list[torch.device], **inputs: Any
    ) -> PlacementPlan:
        """The launching process's plan (:data:`PLAN_ENV`) for this rank's group, else planned here."""
        handed = os.environ.get(PLAN_ENV)
        if handed is None:
            return super().compute_plan(module, devices, **inputs)
        plan = plan_from_json(module, devices, handed, **inputs, max_memory=self.split.max_memory)
        if self.split.placement == DEVICE_MAP:
            check_device_map_agrees(module, devices, plan)
        return plan

    @override
    def check_plan(self, plan: PlacementPlan) -> None:
        """The same plan on every rank, checked before anything moves."""
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            check_same_plan(plan, self.global_rank, all_gather_strings)

    @override
    def model_to_device(self) -> None:
        """Split this process's copy over its group; warn about group positions the placement leaves empty."""
        super().model_to_device()
        assert self.applied is not None
        used = {e.position for e in self.applied.plan.entries}
        unused = sorted(set(range(self.devices_per_process)) - used)
        if unused:
            rank_zero_warn(
                f"ddp_split: the placement leaves device position(s) {unused} of each process's group "
                f"{[str(d) for d in self.device_group]} unused; they hold no part of the model."
            )

    @override
    def determine_ddp_device_ids(self) -> list[int] | None:
        """torch's DDP needs ``device_ids=None`` for a module spread over several devices."""
        return None

    # Lightning binds the process group to ``root_device`` (``init_process_group(device_id=...)``). A bound
    # NCCL group refuses collectives on the process's other devices, and DDP's parameter check,
    # ``_sync_module_states`` and buffer broadcasts touch all of them: the group is created unbound, and
    # ``barrier`` names its device (Lightning passes ``determine_ddp_device_ids()``, None here).

    @override
    def setup_distributed(self) -> None:
        """Lightning's, without binding the process group to one device of the group."""
        reset_seed()
        self.set_world_ranks()
        self._process_group_backend = self._get_process_group_backend()
        assert self.cluster_environment is not None
        _init_dist_connection(self.cluster_environment, self._process_group_backend, timeout=self._timeout)

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        """Under NCCL, a barrier on this process's output device (named: the group is unbound, and NCCL
        would otherwise guess a device from the rank)."""
        if self.run_interrupted:
            return
        if not _distributed_is_initialized():
            super().barrier(*args, **kwargs)
        elif torch.distributed.get_backend() == "nccl":
            torch.distributed.barrier(device_ids=[self.root_device.index])
        else:
            torch.distributed.barrier()

    @override
    @contextmanager
    def gradient_sync_blocked(self) -> Iterator[None]:
        """1F1B interleaves several micro-batches' backwards: DDP's reducer stays out of them, and
        :meth:`after_scheduled_backward` averages the accumulated gradients once."""
        with self.block_backward_sync():
            yield

    @override
    def after_scheduled_backward(self) -> None:
        assert self.lightning_module is not None
        all_reduce_gradients(self.lightning_module)

    def _check_group_positions(self, k: int) -> None:
        """Positions are relative to a process's group: one >= k would cross into another process."""
        crossing = sorted(p for p in self.split.positions_used() if not 0 <= p < k)
        if crossing:
            raise DDPLaunchError(
                f"ddp_split with devices_per_process={k}: placement position(s) {crossing} lie outside a "
                f"process's own group. Positions count within the group, 0..{k - 1}; a stage on another "
                "process's device would cross process groups, which DDP cannot train."
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
