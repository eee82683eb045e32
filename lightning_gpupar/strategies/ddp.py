"""DDPStrategy: Lightning's DDP, with its options as plain config values and a Hydra-aware launcher.

How it works: docs/internals.md, section ``lightning_gpupar/strategies/ddp.py``.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from typing_extensions import override

from lightning_gpupar.checkpoint import CanonicalCheckpointMixin
from lightning_gpupar.ddp import signals
from lightning_gpupar.ddp.checks import check_backend, check_launch_environment, check_timeout
from lightning_gpupar.ddp.launcher import DDPLaunchError, HydraAwareScriptLauncher
from lightning_gpupar.ddp.rendezvous import check_rendezvous
from lightning_gpupar.devices.agreement import check_strategy_devices
from lightning_gpupar.model_split import ModelSplit

log = logging.getLogger(__name__)

StartMethod = Literal["popen", "spawn", "fork", "forkserver"]

#: torch.distributed's default process-group timeout, in seconds.
DEFAULT_TIMEOUT_S = 1800.0


class DDPStrategy(CanonicalCheckpointMixin, LightningDDPStrategy):
    """One process per device, Lightning's DDP underneath; construct it from a config or by hand.

    Args:
        find_unused_parameters: let DDP tolerate parameters that get no gradient in a step.
        static_graph: promise DDP the graph is the same every step (enables its optimisations).
        gradient_as_bucket_view: gradients alias DDP's communication buckets (saves memory).
        process_group_backend: ``"nccl"``, ``"gloo"``...; ``None`` picks by device (gloo on CPU).
        timeout: seconds a collective (and the rendezvous) may wait before every rank fails.
        start_method: ``"popen"`` re-runs the script per rank (Hydra-aware); others as in Lightning.
        **kwargs: any other argument of Lightning's ``DDPStrategy`` or of torch's
            ``DistributedDataParallel`` (``bucket_cap_mb``, ``ddp_comm_hook``, ``cluster_environment``...).
    """

    strategy_name = "ddp"
    #: Devices each process trains on (one; :class:`DDPSplitStrategy` owns a group of them).
    devices_per_process = 1

    def __init__(
        self,
        *,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
        gradient_as_bucket_view: bool = False,
        process_group_backend: str | None = None,
        timeout: float | timedelta | None = DEFAULT_TIMEOUT_S,
        start_method: StartMethod = "popen",
        **kwargs: Any,
    ) -> None:
        _refuse_split_options(kwargs)
        check_backend(process_group_backend)
        check_launch_environment()
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=check_timeout(timeout),
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            **kwargs,
        )

    @property
    def node_devices(self) -> list[torch.device] | None:
        """Every device the processes of this node train on (what the launcher hands its children)."""
        return self.parallel_devices

    @property
    def process_devices(self) -> list[torch.device]:
        """The devices this process trains on: its one device (a group of them under ``ddp_split``)."""
        return [self.root_device]

    @override
    def setup(self, trainer: pl.Trainer) -> None:
        signals.install(trainer)  # SIGTERM reaches every rank and ends the run without a hang
        super().setup(trainer)

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """Every rank, every step: agree whether a rank heard SIGTERM (then all stop after this step), here
        only on a Lightning whose loop does not ask every step (see :func:`signals.install`)."""
        super().on_train_batch_start(batch, batch_idx)
        assert self.lightning_module is not None
        signals.agree(self.lightning_module.trainer, self.root_device)

    @override
    def barrier(self, name: str | None = None) -> None:
        """Lightning's barrier, skipped once the run was interrupted (see :meth:`run_interrupted`)."""
        if not self.run_interrupted:
            super().barrier(name)

    @property
    def run_interrupted(self) -> bool:
        """Whether the run was interrupted (a signal, an error): a rank may be gone then, so barriers are
        skipped, and rank 0 saves its on-exception checkpoint alone (the weights are the same on every
        rank)."""
        trainer = getattr(self._lightning_module, "_trainer", None)
        return trainer is not None and trainer.interrupted

    @override
    def _configure_launcher(self) -> None:
        """Lightning's choice of launcher, with our Hydra-aware one in place of its script launcher."""
        if self._start_method != "popen":
            super()._configure_launcher()
            return
        assert self.cluster_environment is not None
        self._launcher = HydraAwareScriptLauncher(
            self.cluster_environment, self.num_processes, self.num_nodes, self.node_devices
        )

    @override
    def setup_environment(self) -> None:
        """Check this process's devices exist on this node, then create the process group."""
        module = self.lightning_module  # start methods other than popen: the launcher did not check
        check_strategy_devices(module._trainer if module else None, type(self).__name__, self.node_devices)
        self._check_process_devices()
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

    @override
    def setup_distributed(self) -> None:
        """Check the node rank and ``MASTER_ADDR`` in seconds (:mod:`lightning_gpupar.ddp.rendezvous`),
        then rendezvous as Lightning does."""
        self.set_world_ranks()
        assert self.cluster_environment is not None
        timeout = self._timeout.total_seconds() if self._timeout is not None else None
        check_rendezvous(self.cluster_environment, self.num_nodes, self.global_rank, timeout)
        super().setup_distributed()

    def _check_process_devices(self) -> None:
        """Every device this process trains on (its whole group under ``ddp_split``) exists here."""
        cuda = {d: d.index for d in self.process_devices if d.type == "cuda" and d.index is not None}
        visible = torch.cuda.device_count() if cuda else 0
        missing = [d for d, index in cuda.items() if index >= visible]
        if missing:
            raise DDPLaunchError(
                f"Rank {self.global_rank} (node {self.node_rank}, local rank {self.local_rank}) should "
                f"train on {', '.join(map(str, missing))}, but this node sees {visible} GPU(s) "
                f"(ids 0..{visible - 1}). Every node needs the devices in strategy.device_ids; choose ids "
                "that exist on all nodes."
            )


def _refuse_split_options(kwargs: dict[str, Any]) -> None:
    """A split option given to plain DDP would reach torch's DDP constructor and fail there, late."""
    given = [name for name in ("devices_per_process", *ModelSplit.option_names()) if name in kwargs]
    if given:
        raise DDPLaunchError(
            f"DDPStrategy got {', '.join(given)}, option(s) that split a model over each process's devices. "
            "Use DDPSplitStrategy(devices_per_process=k, ...) (strategy=ddp_split) with k >= 2, or "
            "ModelSplitStrategy (strategy=model_split) for one process."
        )
