"""The module ``ModelSplitStrategy`` lived in before 0.2, kept so that configs naming
``lightning_gpupar.strategies.split.ModelSplitStrategy`` as their ``_target_`` keep working."""

from lightning_gpupar.strategies.model_split import ModelSplitStrategy

__all__ = ["ModelSplitStrategy"]
