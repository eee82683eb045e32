"""Model splitting: one model copy's submodules placed on several devices, optionally pipelined.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/__init__.py``.
"""

from lightning_gpupar.model_split.errors import PipelineError, PlacementError
from lightning_gpupar.model_split.hooks import PlacementHandle, apply_placement
from lightning_gpupar.model_split.pipeline import Pipeline, Recompute, install_pipeline
from lightning_gpupar.model_split.plan import (
    PlacedModule,
    Placement,
    PlacementPlan,
    infer_stages,
    plan_placement,
)
from lightning_gpupar.model_split.split import AppliedSplit, ModelSplit

__all__ = [
    "AppliedSplit",
    "ModelSplit",
    "Pipeline",
    "PipelineError",
    "PlacedModule",
    "Placement",
    "PlacementError",
    "PlacementHandle",
    "PlacementPlan",
    "Recompute",
    "apply_placement",
    "infer_stages",
    "install_pipeline",
    "plan_placement",
]
