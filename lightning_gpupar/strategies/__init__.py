"""The Lightning-facing layer: one file per strategy, and their registration under Lightning's names.

How it works: docs/internals.md, section ``lightning_gpupar/strategies/__init__.py``.
"""

from typing import Any, NamedTuple

from lightning.pytorch.strategies import Strategy, StrategyRegistry

from lightning_gpupar.strategies.ddp import DDPStrategy
from lightning_gpupar.strategies.ddp_split import DDPSplitStrategy
from lightning_gpupar.strategies.dp import DataParallelStrategy
from lightning_gpupar.strategies.model_split import ModelSplitStrategy
from lightning_gpupar.strategies.single import SingleStrategy

__all__ = [
    "DDPSplitStrategy",
    "DDPStrategy",
    "DataParallelStrategy",
    "ModelSplitStrategy",
    "SingleStrategy",
    "register_strategies",
]


class Registration(NamedTuple):
    cls: type[Strategy]
    description: str
    init_params: dict[str, Any] | None = None


#: What ``Trainer(strategy=name)`` selects once lightning_gpupar is imported. Lightning's own "ddp" stays
#: Lightning's; our DDPStrategy is reached by import or through Hydra's ``_target_``.
STRATEGIES: dict[str, Registration] = {
    "dp": Registration(
        DataParallelStrategy, "One process, the batch split over the chosen devices, a replica per device."
    ),
    "model_split": Registration(
        ModelSplitStrategy,
        "One process, the model's submodules placed on the chosen devices, optionally pipelined.",
    ),
    "ddp_split": Registration(
        DDPSplitStrategy,
        "DDP where each process owns 2 devices holding one split copy of the model (placement 'auto').",
        {"devices_per_process": 2},
    ),
}


def register_strategies() -> None:
    """Add our names to Lightning's registry (idempotent; call before the Trainer is built)."""
    for name, entry in STRATEGIES.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(
                name, entry.cls, description=entry.description, **(entry.init_params or {})
            )
