"""The one base of every error this package raises: ``except GpuparError`` catches any refusal of ours.

Each error class also keeps its builtin base (``ValueError`` for bad input, ``RuntimeError`` for a run
that cannot go on), so code that already catches those keeps working.
"""


class GpuparError(Exception):
    """Base of every exception raised by lightning_gpupar."""
