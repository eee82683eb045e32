"""The base of our one-process strategies (dp, model_split): several devices, no process group.

Lightning's ``ParallelStrategy`` assumes one process per device. Here there is one process in all, so
ranks are 0, the world has size 1, every sample goes to this process, and collectives are identities.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor
from typing_extensions import override

from lightning_gpupar.devices.agreement import check_strategy_devices


class SingleProcessStrategy(ParallelStrategy):
    """A ``ParallelStrategy`` over ``parallel_devices`` driven from one process."""

    @override
    def setup_environment(self) -> None:
        """Refuse ``parallel_devices`` that the Trainer's ``devices`` contradicts, before any step."""
        module = self.lightning_module
        trainer = module._trainer if module is not None else None
        check_strategy_devices(trainer, type(self).__name__, self.parallel_devices)
        super().setup_environment()

    @property
    @override
    def global_rank(self) -> int:
        return 0

    @property
    @override
    def local_rank(self) -> int:
        return 0

    @property
    @override
    def node_rank(self) -> int:
        return 0

    @property
    @override
    def world_size(self) -> int:
        return 1

    @property
    @override
    def distributed_sampler_kwargs(self) -> dict[str, Any]:
        return {"num_replicas": 1, "rank": 0}  # one process sees every sample

    @override
    def reduce(self, tensor: Any, *args: Any, **kwargs: Any) -> Any:
        """Values are already complete in this one process."""
        return tensor

    @override
    def barrier(self, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    def broadcast(self, obj: Any, src: int = 0) -> Any:
        return obj

    @override
    def all_gather(self, tensor: Tensor, group: Any | None = None, sync_grads: bool = False) -> Tensor:
        return tensor

    @override
    def reduce_boolean_decision(self, decision: bool, all: bool = True) -> bool:
        return decision
