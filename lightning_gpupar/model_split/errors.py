"""The errors of model splitting: a placement that cannot be used, a stage chain that cannot be pipelined."""

from lightning_gpupar.errors import GpuparError


class PlacementError(GpuparError, ValueError):
    """A placement that cannot be used; the message names the submodule, position or size at fault."""


class PipelineError(PlacementError):
    """A stage sequence that cannot be pipelined; the message says which stage and what to declare."""
