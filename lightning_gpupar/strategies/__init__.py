"""Our strategies, and their registration under Lightning's strategy names."""

from lightning.pytorch.strategies import Strategy, StrategyRegistry

from lightning_gpupar.strategies.dp import DataParallelStrategy
from lightning_gpupar.strategies.split import ModelSplitStrategy

__all__ = ["DataParallelStrategy", "ModelSplitStrategy", "register_strategies"]

#: Name -> (class, description): what ``Trainer(strategy=name)`` selects once lightning_gpupar is imported.
STRATEGIES: dict[str, tuple[type[Strategy], str]] = {
    "dp": (
        DataParallelStrategy,
        "One process, the batch split over the chosen devices, a replica per device.",
    ),
    "model_split": (
        ModelSplitStrategy,
        "One process, the model's submodules placed on the chosen devices, optionally pipelined.",
    ),
}


def register_strategies() -> None:
    """Add our names to Lightning's registry (idempotent; call before the Trainer is built)."""
    for name, (cls, description) in STRATEGIES.items():
        if name not in StrategyRegistry:
            StrategyRegistry.register(name, cls, description=description)
