"""Mixed precision per stage: each stage autocasts for its own device type.

Lightning's ``bf16-mixed`` / ``16-mixed`` autocast covers one device type, the accelerator's: with GPU
stages and a CPU stage, the CPU stage would receive reduced-precision activations against its float32
weights (``mat1 and mat2 must have the same dtype``). Here every other device type among the stages gets
its own autocast: on the CPU bfloat16 where the CPU supports it, else the stage runs in float32 (its
floating inputs are cast to float32 by the placement hooks). The plan says which, per device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class StagePrecision:
    """How the stages of one device compute under mixed precision.

    ``autocast``: the dtype autocast uses on that device type (``None``: no autocast, float32 inputs);
    ``own``: the autocast is ours, not the precision plugin's.
    """

    device_type: str
    autocast: torch.dtype | None
    own: bool = False

    @property
    def casts_inputs(self) -> bool:
        """Floating inputs are cast to float32: the stage runs without autocast."""
        return self.autocast is None

    def describe(self) -> str:
        if self.autocast is None:
            return (
                f"float32 (this {self.device_type.upper()} has no bfloat16 support; inputs cast to float32)"
            )
        name = str(self.autocast).removeprefix("torch.")
        whose = "stage's own" if self.own else "Lightning's"
        return f"{name} autocast ({self.device_type}, {whose})"


def cpu_supports_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN's check: AVX512-BF16, AMX or similar)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def stage_precisions(
    devices: Sequence[torch.device], device_type: str, dtype: torch.dtype
) -> tuple[StagePrecision, ...]:
    """Per position: Lightning's autocast (``device_type``, ``dtype``) where the device is of that type;
    elsewhere the CPU's own bfloat16 autocast where supported, else float32."""
    result = []
    for device in devices:
        if device.type == device_type:
            result.append(StagePrecision(device.type, dtype))
        elif device.type == "cpu" and cpu_supports_bf16():
            result.append(StagePrecision("cpu", torch.bfloat16, own=True))
        else:
            result.append(StagePrecision(device.type, None, own=True))
    return tuple(result)


@contextlib.contextmanager
def stage_autocast(precisions: Sequence[StagePrecision]) -> Iterator[None]:
    """Enter the stages' own autocasts (one per device type; autocast state is per device type, so each
    touches only the stages of its type); Lightning's own is entered by its precision plugin."""
    with contextlib.ExitStack() as stack:
        for device_type, dtype in {(p.device_type, p.autocast) for p in precisions if p.own and p.autocast}:
            stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=False))
        yield


def float32_inputs(data: torch.Tensor) -> torch.Tensor:
    """A reduced-precision floating tensor as float32 (others unchanged): a float32 stage's input."""
    if data.is_floating_point() and data.dtype in (torch.float16, torch.bfloat16):
        return data.float()
    return data
