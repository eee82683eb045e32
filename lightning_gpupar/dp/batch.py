"""Nested batches: split along dim 0 into shards, and describe their structure in error messages.

A batch is any nesting of dicts, lists, tuples, namedtuples and dataclasses around tensors (Lightning's
``apply_to_collection`` walks them). Tensors are split along their first dimension; everything else
(strings, numbers, ``None``) is given unchanged to every shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gpupar.errors import GpuparError


class BatchSplitError(GpuparError, ValueError):
    """A batch that cannot be split along dim 0; the message shows its structure."""


def describe(batch: Any, depth: int = 0) -> str:
    """A one-line sketch of a nested batch: ``dict(x=Tensor[8, 3], y=Tensor[7], meta=str)``."""
    if isinstance(batch, Tensor):
        return f"Tensor{list(batch.shape)}"
    if depth > 4:
        return "..."
    if isinstance(batch, Mapping):
        inner = ", ".join(f"{k}={describe(v, depth + 1)}" for k, v in batch.items())
        return f"{type(batch).__name__}({inner})"
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        fields = dataclasses.fields(batch)
        inner = ", ".join(f"{f.name}={describe(getattr(batch, f.name), depth + 1)}" for f in fields)
        return f"{type(batch).__name__}({inner})"
    if isinstance(batch, Sequence) and not isinstance(batch, str):
        inner = ", ".join(describe(v, depth + 1) for v in batch)
        return (
            f"{type(batch).__name__}({inner})"
            if hasattr(batch, "_fields")
            else f"{type(batch).__name__}[{inner}]"
        )
    return type(batch).__name__


def batch_size(batch: Any) -> int:
    """The common first dimension of every tensor in the batch (raises BatchSplitError otherwise)."""
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0] if t.dim() > 0 else -1))
    if not sizes:
        raise BatchSplitError(
            f"Cannot split a batch with no tensor in it: {describe(batch)}. Data parallel strategies split "
            "tensors along dim 0; return tensors from your DataLoader / collate_fn."
        )
    if -1 in sizes:
        raise BatchSplitError(
            f"Cannot split a 0-dim tensor along dim 0 in batch {describe(batch)}. "
            "Give every tensor a leading batch dimension."
        )
    if len(set(sizes)) > 1:
        raise BatchSplitError(
            f"Tensors in the batch disagree on their first (batch) dimension {sorted(set(sizes))}: "
            f"{describe(batch)}. Every tensor must have the same dim 0 to be split into shards."
        )
    if sizes[0] == 0:
        raise BatchSplitError(
            f"Cannot split an empty batch (dim 0 is 0): {describe(batch)}. Every step needs at least one "
            "sample; filter empty batches out in your DataLoader / collate_fn."
        )
    return sizes[0]


def _frozen_dataclass(batch: Any, depth: int = 0) -> str | None:
    """The name of a frozen dataclass in ``batch``, for the error once ``apply_to_collection`` refused it."""
    if depth > 16 or isinstance(batch, Tensor | str | bytes):
        return None
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        if type(batch).__dataclass_params__.frozen:  # type: ignore[attr-defined]
            return type(batch).__name__
        children: Any = [getattr(batch, f.name) for f in dataclasses.fields(batch)]
    elif isinstance(batch, Mapping):
        children = batch.values()
    elif isinstance(batch, Sequence):
        children = batch
    else:
        return None
    return next((name for c in children if (name := _frozen_dataclass(c, depth + 1))), None)


def shard_sizes(total: int, parts: int) -> list[int]:
    """Sizes of at most ``parts`` contiguous, near-equal shards of ``total`` samples (no empty shard)."""
    parts = min(parts, total)
    base, extra = divmod(total, parts)
    return [base + 1 if i < extra else base for i in range(parts)]


def split_batch(batch: Any, parts: int) -> tuple[list[Any], list[int]]:
    """Split ``batch`` along dim 0 into at most ``parts`` shards; return the shards and their sizes.

    Shards are views in order, so concatenating per-sample outputs restores the original order.
    A batch smaller than ``parts`` gives one shard per sample.
    """
    try:
        sizes = shard_sizes(batch_size(batch), parts)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        shards = [
            apply_to_collection(batch, Tensor, lambda t, s=start, n=size: t.narrow(0, s, n))
            for start, size in zip(starts, sizes, strict=True)
        ]
    except ValueError as err:  # apply_to_collection refuses frozen dataclasses, which it cannot rebuild
        if not isinstance(err.__cause__, dataclasses.FrozenInstanceError):
            raise
        raise BatchSplitError(
            f"Cannot split batch {describe(batch)}: the frozen dataclass {_frozen_dataclass(batch)} cannot "
            "be rebuilt around its shards (Lightning's batch transfer to a device refuses it too). Declare "
            "it without frozen=True, or use a dict or namedtuple."
        ) from err
    return shards, sizes
