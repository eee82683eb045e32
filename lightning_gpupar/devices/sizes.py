"""Byte sizes as users write them (``"10GiB"``, ``"1.5GB"``) and as messages print them."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def parse_bytes(value: int | str) -> int:
    """``"10GiB"`` -> 10737418240; ``"1.5GB"`` -> 1500000000; ints pass through."""
    if isinstance(value, int):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if match is None or match.group(2).lower() not in UNITS:
        raise ValueError(f"Cannot read {value!r} as a size: write e.g. 512MiB, 10GiB or 1.5GB.")
    return int(float(match.group(1)) * UNITS[match.group(2).lower()])


def format_bytes(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number >= 1."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
