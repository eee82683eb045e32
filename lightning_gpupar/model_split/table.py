"""Render a plan's training memory per device: each part, the total, the cap or free memory, the headroom,
and a text bar (drawn with ``rich``, plain characters, no colour codes)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from rich.bar import Bar
from rich.console import Console
from rich.table import Table

from lightning_gpupar.devices.sizes import format_bytes
from lightning_gpupar.model_split.memory import MemoryParts

if TYPE_CHECKING:
    from lightning_gpupar.model_split.plan import PlacementPlan

BAR_WIDTH = 20


def describe_parts(parts: MemoryParts) -> str:
    """``1.2 MiB = params 300 KiB + buffers 0 B + grads ...``."""
    listing = ", ".join(
        f"{name} {format_bytes(getattr(parts, name))}"
        for name in ("params", "buffers", "grads", "optimizer", "activations")
    )
    return f"{format_bytes(parts.total)} ({listing})"


def memory_table(plan: PlacementPlan, free_bytes: Callable[[torch.device], int | None] | None = None) -> str:
    """One row per device: the parts of training memory, total, limit (cap or free memory), headroom, bar."""
    grid = Table(box=None, pad_edge=False, show_edge=False, header_style="", title=None)
    for column in ("pos", "device", "params", "buffers", "grads", "optimizer", "activations", "total"):
        grid.add_column(column, justify="left" if column in ("pos", "device") else "right")
    grid.add_column("limit", justify="right")
    grid.add_column("headroom", justify="right")
    grid.add_column("use", justify="left", no_wrap=True)
    parts = plan.memory_per_position()
    totals = [p.total for p in parts]
    scale = max(totals) or 1
    for pos, (device, part) in enumerate(zip(plan.devices, parts, strict=True)):
        cap = plan.caps[pos] if pos < len(plan.caps) else float("inf")
        free = free_bytes(device) if free_bytes is not None else None
        limits = [c for c in (cap, free) if c is not None and c != float("inf")]
        limit = min(limits) if limits else None
        headroom = format_bytes(limit - part.total) if limit is not None else "-"
        size = limit if limit is not None and limit >= part.total else scale
        label = "" if limit is None else (" free" if free is not None and limit == free else " cap")
        marker = " <- output" if pos == plan.output_position else ""
        grid.add_row(
            str(pos),
            f"{device}{marker}",
            *(format_bytes(getattr(part, name)) for name in ("params", "buffers", "grads", "optimizer")),
            format_bytes(part.activations),
            format_bytes(part.total),
            "-" if limit is None else format_bytes(limit) + label,
            headroom,
            Bar(size, 0, part.total, width=BAR_WIDTH),
        )
    console = Console(file=io.StringIO(), width=200, color_system=None, legacy_windows=False)
    console.print(grid)
    text = console.file.getvalue().rstrip()  # type: ignore[attr-defined]
    lines = [line.rstrip() for line in text.splitlines()]
    sources = plan.sources
    notes = [
        "training memory per device = parameters + buffers + gradients + optimizer state + activations",
        f"optimizer state: {sources.get('optimizer', 'not counted')}",
        f"activations: {sources.get('activations', 'not counted')}",
    ]
    if plan.tied:
        notes.append(
            "tied (counted once, with the first): " + ", ".join(f"{a} = {b}" for a, b in plan.tied.items())
        )
    if totals and min(totals) > 0:
        notes.append(f"balance: largest/smallest device total = {max(totals) / min(totals):.2f}")
    return "\n".join(lines + notes)
