"""``gpupar-devices``: the devices this process sees, their memory, and what ``"auto"`` would pick."""

from __future__ import annotations

import argparse
import os

import torch
from rich.console import Console
from rich.table import Table

from lightning_gpupar.devices import auto_select, format_bytes, parse_bytes, query_inventory
from lightning_gpupar.devices import locks as device_locks


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpupar-devices", description=__doc__)
    parser.add_argument(
        "--min-free-memory",
        type=_size,
        default="1GiB",
        help="what 'auto' requires free on a GPU, e.g. 512MiB or 10GiB (default: 1GiB)",
    )
    args = parser.parse_args(argv)
    console = Console(soft_wrap=True)
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        console.print(f"CUDA_VISIBLE_DEVICES={visible!r}: ids below count from 0 within that list.")

    inventory = query_inventory()
    gpus = inventory.gpus
    if not gpus:
        console.print(
            f"No CUDA device is visible to this process (torch {torch.__version__}, "
            f"CUDA build: {'yes' if torch.version.cuda else 'no'}).\n"
            f"CPU replicas are available ({os.cpu_count()} CPU cores): for example\n"
            "  python examples/train.py strategy=dp trainer.accelerator=cpu strategy.device_ids=2"
        )
        return 0

    min_free: int = args.min_free_memory
    holders = {g.index: device_locks.holder(g.uuid) if g.uuid is not None else None for g in gpus}
    picked = [i for i in auto_select(gpus, min_free) if holders[i] is None]  # as 'auto' would: free GPUs
    table = Table(title="CUDA devices")
    for column in ("id", "name", "total", "free", "util", "processes", "held by gpupar run", "auto"):
        table.add_column(column)
    for g in gpus:
        table.add_row(
            str(g.index),
            g.name,
            format_bytes(g.total_bytes),
            format_bytes(g.free_bytes),
            "-" if g.utilization_percent is None else f"{g.utilization_percent}%",
            "-" if g.processes is None else (", ".join(g.processes) or "none"),
            holders[g.index] or "",
            f"#{picked.index(g.index) + 1}" if g.index in picked else "",
        )
    console.print(table)
    console.print(
        f"device_ids=auto picks {picked or 'nothing'} "
        f"(GPUs with at least {format_bytes(min_free)} free that no other gpupar run holds, most free first)."
    )
    if inventory.source == "nvml":
        console.print("Memory, utilisation and processes from NVML (no CUDA context was created).")
    else:
        console.print(
            f"Memory from torch.cuda.mem_get_info, which created a CUDA context on every GPU above: "
            f"{inventory.note}. Install nvidia-ml-py (pip install 'lightning-gpupar[nvml]') for NVML, "
            "utilisation and process lists."
        )
    held = [str(i) for i, holder in holders.items() if holder]
    if held:
        console.print(
            f"GPU(s) {', '.join(held)} are held by gpupar runs that chose them with device_ids=auto: other "
            f"'auto' runs skip them (lock files in {device_locks.lock_dir()})."
        )
    return 0


def _size(value: str) -> int:
    """argparse type: a memory size, or a usage error that says how to write one."""
    try:
        return parse_bytes(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


if __name__ == "__main__":
    raise SystemExit(main())
