"""Model splitting: one model copy's submodules placed on several devices, optionally pipelined.

The layers, each its own module, in the order a split is made:

- :mod:`~.paths`: submodule paths, ``ModuleList`` ranges, walks of the module tree;
- :mod:`~.plan`: which submodule goes on which device (a map, ``"auto"``, or ``"device_map"``: read by
  :mod:`~.device_map` from a transformers model's ``hf_device_map``), computed before anything moves;
  for ``"auto"``, :mod:`~.auto` walks the tree and partitions it, :mod:`~.memory` counts the training memory,
  :mod:`~.balance` times the stages (``balance="time"``), :mod:`~.table` renders the plan and
  :mod:`~.handoff` hands it to DDP ranks;
- :mod:`~.hooks`: apply a plan: move the submodules (accelerate's hooks off, quantized weights left alone),
  hook the moves of activations; :mod:`~.precision`: under mixed precision, each stage's own autocast;
- :mod:`~.chain_check` and :mod:`~.pipeline`: the GPipe micro-batch schedule over a chain of stages, with
  :mod:`~.batchnorm` (BatchNorm statistics deferred to once per step) and :mod:`~.trace` (the schedule drawn);
- :mod:`~.split`: :class:`ModelSplit`, the user's options applied to a module and a device list.

The Lightning strategies on top: :mod:`lightning_gpupar.strategies.model_split` (one process) and
:mod:`lightning_gpupar.strategies.ddp_split` (one split copy per DDP process).
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
