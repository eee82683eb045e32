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
from datetime import timedelta
from typing import Any, Literal

import torch
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy

from lightning_gpupar.checkpoint import CanonicalCheckpointMixin
from lightning_gpupar.launchers import DDPLaunchError, HydraAwareScriptLauncher

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
        if isinstance(timeout, int | float):
            timeout = timedelta(seconds=timeout)
        super().__init__(
            process_group_backend=process_group_backend,
            timeout=timeout,
            start_method=start_method,
            find_unused_parameters=find_unused_parameters,
            static_graph=static_graph,
            gradient_as_bucket_view=gradient_as_bucket_view,
            **kwargs,
        )

    def _configure_launcher(self) -> None:
        """Lightning's choice of launcher, with our Hydra-aware one in place of its script launcher."""
        if self._start_method != "popen":
            super()._configure_launcher()
            return
        assert self.cluster_environment is not None
        self._launcher = HydraAwareScriptLauncher(
            self.cluster_environment, self.num_processes, self.num_nodes
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
        device = self.root_device
        if device.type != "cuda" or device.index is None:
            return
        visible = torch.cuda.device_count()
        if device.index >= visible:
            raise DDPLaunchError(
                f"Rank {self.global_rank} (node {self.node_rank}, local rank {self.local_rank}) should "
                f"train on {device}, but this node sees {visible} GPU(s) (ids 0..{visible - 1}). Every node "
                "needs the devices in strategy.device_ids; choose ids that exist on all nodes."
            )
