"""Nested batches: split along dim 0 into shards, and describe their structure in error messages.

A batch is any nesting of dicts, lists, tuples, namedtuples and dataclasses around tensors (Lightning's
``apply_to_collection`` walks them). Tensors are split along their first dimension; a list or tuple with
one item per sample (:func:`sequence_role`, the rule :mod:`~.gather` shares) is split with the samples;
everything else (strings, numbers, ``None``, other lists) is given unchanged to every shard.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from lightning_utilities.core.apply_func import apply_to_collection, is_namedtuple
from torch import Tensor

from lightning_gpupar.errors import GpuparError

#: The roles :func:`sequence_role` gives a list or tuple.
PER_SAMPLE, RECORD, AMBIGUOUS = "per-sample", "record", "ambiguous"


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


def sequence_role(value: Any, n: int) -> str:
    """Whether a list or tuple in a batch (or a step's output) of ``n`` samples holds one item per sample.

    The one rule for splitting batches and gathering outputs (docs/dp.md, "Lists with one item per sample"):

    * :data:`PER_SAMPLE`: its length is ``n`` and its items are samples' values: strings, objects, ``None``,
      tensors that are not a batch of ``n``, dicts of those; or tensors of which not all are a batch of
      ``n`` (variable-length boxes). Split / concatenated with the samples.
    * :data:`RECORD`: any other length, a namedtuple, or items that are batches of ``n`` (tensors with
      first dimension ``n``, per-sample lists), possibly beside scalars and ``None``: ``(x, y)``,
      ``[loss, logits]``. Its items are split / gathered one by one.
    * :data:`AMBIGUOUS`: length ``n`` but the items do not say which: only numbers (``n`` ids, or a record
      of ``n`` numbers?), only lists of length ``n``, or batches beside per-sample values. Refused.
    """
    if not isinstance(value, list | tuple) or is_namedtuple(value) or len(value) != n:
        return RECORD
    if all(isinstance(item, Tensor) and item.dim() > 0 for item in value):  # [x, y] or ragged boxes
        return RECORD if all(item.shape[0] == n for item in value) else PER_SAMPLE
    kinds = {_kind(item, n) for item in value} - {"empty"}
    if kinds <= {"sample"}:
        return PER_SAMPLE
    if "batched" in kinds and kinds <= {"batched", "scalar", "maybe-batched"}:
        return RECORD
    return AMBIGUOUS


def _kind(item: Any, n: int, depth: int = 0) -> str:
    """``batched``, ``maybe-batched`` (a list of ``n`` non-tensors), ``sample``, ``scalar``, ``empty`` or
    ``mixed``: what an item of a length-``n`` sequence is."""
    if isinstance(item, Tensor):
        return "scalar" if item.dim() == 0 else "batched" if item.shape[0] == n else "sample"
    if item is None:
        return "empty"
    if isinstance(item, bool | int | float | complex):
        return "scalar"
    if isinstance(item, str | bytes) or depth > 16:
        return "sample"
    if isinstance(item, list | tuple) and not is_namedtuple(item):
        role = sequence_role(item, n)
        if role == PER_SAMPLE:
            holds_tensor = any(isinstance(i, Tensor) for i in item)
            return "batched" if holds_tensor else "maybe-batched"
        if role == AMBIGUOUS:
            return "mixed"
    children = _children(item)
    if children is None:
        return "sample"  # any other object: a sample's value
    kinds = {_kind(child, n, depth + 1) for child in children} - {"empty"}
    if not kinds:
        return "empty"
    if len(kinds) == 1:
        return kinds.pop()
    if "batched" in kinds and kinds <= {"batched", "scalar", "maybe-batched"}:
        return "batched"
    return "mixed"


def _children(value: Any) -> list[Any] | None:
    """The values a collection holds, or ``None`` for a value that is not a collection."""
    if isinstance(value, Mapping):
        return list(value.values())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [getattr(value, f.name) for f in dataclasses.fields(value)]
    if isinstance(value, list | tuple):
        return list(value)
    return None


def _outside_samples(batch: Any, n: int) -> list[Tensor]:
    """The tensors of ``batch`` that are not inside a per-sample sequence (those split along dim 0);
    raises BatchSplitError for an ambiguous sequence."""
    found: list[Tensor] = []

    def visit(value: Any, depth: int) -> None:
        if isinstance(value, Tensor):
            found.append(value)
            return
        if depth > 16 or isinstance(value, str | bytes):
            return
        role = sequence_role(value, n)
        if role == PER_SAMPLE:
            return
        if role == AMBIGUOUS:
            raise BatchSplitError(
                f"Cannot tell whether the {type(value).__name__} {describe(value)} in the batch "
                f"{describe(batch)} holds one item per sample: its length is the batch size {n}, but its "
                "items do not say so (only numbers, only lists, or a batch of tensors beside per-sample "
                "values). Make per-sample numbers a tensor (torch.tensor(ids)), and a record a dict or a "
                "namedtuple; a list of strings or objects with one item per sample is split with the samples."
            )
        for child in _children(value) or []:
            visit(child, depth + 1)

    visit(batch, 0)
    return found


def batch_size(batch: Any) -> int:
    """The number of samples in the batch: the first dimension shared by its tensors outside per-sample
    lists (raises BatchSplitError otherwise)."""
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
    if len(set(sizes)) == 1:
        n = sizes[0]
        _outside_samples(batch, n)  # refuses an ambiguous sequence
    else:  # tensors inside per-sample lists (variable-length boxes) have their own first dimensions
        fits = [n for n in sorted(set(sizes)) if _fits(batch, n)]
        if len(fits) != 1:
            raise BatchSplitError(
                f"Tensors in the batch disagree on their first (batch) dimension {sorted(set(sizes))}: "
                f"{describe(batch)}. Every tensor must have the same dim 0 to be split into shards, except "
                "inside a list with one tensor per sample."
            )
        n = fits[0]
    if n == 0:
        raise BatchSplitError(
            f"Cannot split an empty batch (dim 0 is 0): {describe(batch)}. Every step needs at least one "
            "sample; filter empty batches out in your DataLoader / collate_fn."
        )
    return n


def _fits(batch: Any, n: int) -> bool:
    """Whether ``n`` samples explain the batch: every tensor outside per-sample lists has dim 0 ``n``."""
    try:
        return all(t.shape[0] == n for t in _outside_samples(batch, n))
    except BatchSplitError:
        return False


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
        n = batch_size(batch)
        sizes = shard_sizes(n, parts)
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        shards = [_take(batch, n, start, size) for start, size in zip(starts, sizes, strict=True)]
    except ValueError as err:  # apply_to_collection refuses frozen dataclasses, which it cannot rebuild
        if not isinstance(err.__cause__, dataclasses.FrozenInstanceError):
            raise
        raise BatchSplitError(
            f"Cannot split batch {describe(batch)}: the frozen dataclass {_frozen_dataclass(batch)} cannot "
            "be rebuilt around its shards (Lightning's batch transfer to a device refuses it too). Declare "
            "it without frozen=True, or use a dict or namedtuple."
        ) from err
    return shards, sizes


def _take(batch: Any, n: int, start: int, size: int) -> Any:
    """Samples ``start`` to ``start + size`` of ``batch``: tensors narrowed along dim 0, per-sample lists
    sliced, the rest rebuilt around them (or kept)."""

    def take(value: Any) -> Any:
        if isinstance(value, Tensor):
            return value.narrow(0, start, size)
        if sequence_role(value, n) == PER_SAMPLE:
            return type(value)(value[start : start + size])
        items = [apply_to_collection(item, (Tensor, list, tuple), take) for item in value]
        return type(value)(*items) if is_namedtuple(value) else type(value)(items)

    return apply_to_collection(batch, (Tensor, list, tuple), take)


def split_call(args: tuple[Any, ...], kwargs: dict[str, Any], parts: int) -> tuple[list[Any], list[int]]:
    """:func:`split_batch` for a call's arguments: shards of ``(args, kwargs)``. The argument tuple is a
    record (never one argument per sample), so only each argument's contents follow the per-sample rule."""
    shards, sizes = split_batch({"args": dict(enumerate(args)), "kwargs": kwargs}, parts)
    return [(tuple(s["args"].values()), s["kwargs"]) for s in shards], sizes
