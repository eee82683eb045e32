"""Gather per-replica step outputs onto one device, as if the step had seen the whole batch.

How it works: docs/internals.md, section ``lightning_gpupar/dp/gather.py``.
"""

from __future__ import annotations

import dataclasses
import reprlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import is_dataclass_instance, is_namedtuple
from torch import Tensor

from lightning_gpupar.dp.batch import AMBIGUOUS, PER_SAMPLE, RECORD, describe, sequence_role
from lightning_gpupar.errors import GpuparError


class GatherError(GpuparError, ValueError):
    """Replica outputs that cannot be combined into one; the message names the output's path."""


def gather_outputs(outputs: Sequence[Any], sizes: Sequence[int], device: torch.device) -> Any:
    """Combine the outputs of replicas that processed shards of ``sizes`` samples (see module docstring)."""
    missing = [i for i, out in enumerate(outputs) if out is None]
    if missing:
        if len(missing) == len(outputs):
            return None
        raise RuntimeError(
            f"The step returned None on replica(s) {missing} but a value on the others. Under data "
            "parallelism every replica sees a shard of the same batch: decide to skip a batch from the "
            "whole batch (e.g. in on_train_batch_start, returning -1), not from a shard."
        )
    return _Gatherer(list(sizes), device).gather(list(outputs), "output")


class _Gatherer:
    def __init__(self, sizes: list[int], device: torch.device) -> None:
        self.sizes = sizes
        self.weights = [s / sum(sizes) for s in sizes]
        self.device = device

    def gather(self, values: list[Any], path: str) -> Any:
        first = values[0]
        if isinstance(first, Tensor):
            if first.dim() == 0:
                return sum(w * v.to(self.device) for w, v in zip(self.weights, values, strict=True))
            return torch.cat([v.to(self.device) for v in values])
        if isinstance(first, bool):
            return _same(values, path)
        if isinstance(first, int | float):
            return float(sum(w * v for w, v in zip(self.weights, values, strict=True)))
        if isinstance(first, Mapping):
            return self._mapping(values, path)
        if is_dataclass_instance(first):
            return self._dataclass(values, path)
        if isinstance(first, Sequence) and not isinstance(first, str | bytes):
            return self._sequence(values, path)
        return _same(values, path)

    def _mapping(self, values: list[Any], path: str) -> Any:
        first = values[0]
        keys = [list(v.keys()) for v in values]
        if any(k != keys[0] for k in keys):
            raise GatherError(f"Replicas returned different keys at {path}: {keys}. Return the same keys.")
        gathered = {key: self.gather([v[key] for v in values], f"{path}[{key!r}]") for key in first}
        return gathered if type(first) is dict else type(first)(gathered)

    def _dataclass(self, values: list[Any], path: str) -> Any:
        fields = dataclasses.fields(values[0])
        gathered = {
            f.name: self.gather([getattr(v, f.name) for v in values], f"{path}.{f.name}") for f in fields
        }
        result = dataclasses.replace(values[0], **{f.name: gathered[f.name] for f in fields if f.init})
        for field in fields:
            if not field.init:  # set in __post_init__ or by default; frozen dataclasses included
                object.__setattr__(result, field.name, gathered[field.name])
        return result

    def _role(self, values: list[Any], path: str) -> str:
        """The role every replica's sequence plays for its shard (:func:`sequence_role`); replicas that
        disagree, or an ambiguous sequence, raise a GatherError."""
        roles = {sequence_role(v, size) for v, size in zip(values, self.sizes, strict=True)}
        if [len(v) for v in values] != self.sizes:
            return RECORD  # a record: one length on every replica, unrelated to the shard sizes
        if len(roles) == 1 and AMBIGUOUS not in roles:
            return roles.pop()
        if len(set(self.sizes)) > 1 and RECORD not in roles:
            return PER_SAMPLE  # lengths that follow uneven shard sizes: one item per sample (ids, numbers)
        tensors = all(isinstance(i, Tensor) and i.dim() > 0 for v in values for i in v)
        if roles == {PER_SAMPLE, RECORD} and tensors:
            return PER_SAMPLE  # ragged tensors, of which a shard's happen to match its size
        raise GatherError(
            f"Cannot tell whether the sequences at {path} hold one item per sample: replicas returned "
            f"{', '.join(describe(v) for v in values)} for shards of {self.sizes} samples. Return per-sample "
            "numbers as a tensor, and a record as a dict or a namedtuple (docs/dp.md, 'Lists with one item "
            "per sample')."
        )

    def _sequence(self, values: list[Any], path: str) -> Any:
        first = values[0]
        lengths = [len(v) for v in values]
        if self._role(values, path) == PER_SAMPLE:
            items = [move_data_to_device(item, self.device) for v in values for item in v]
            return type(first)(items)
        if len(set(lengths)) > 1:
            raise GatherError(
                f"Replicas returned sequences of different lengths at {path}: {lengths}, for shards of "
                f"{self.sizes} samples. A list with one item per sample of the shard is concatenated; "
                "other sequences are gathered item by item and need the same length on every replica."
            )
        items = [self.gather([v[i] for v in values], f"{path}[{i}]") for i in range(len(first))]
        return type(first)(*items) if is_namedtuple(first) else type(first)(items)


def _same(values: list[Any], path: str) -> Any:
    """The value every replica returned, or a GatherError if they differ."""
    first = values[0]
    try:
        agree = all(v is first or bool(v == first) for v in values[1:])
    except (TypeError, ValueError, RuntimeError):  # e.g. arrays, whose == is element-wise
        agree = False
    if not agree:
        shown = ", ".join(reprlib.repr(v) for v in values)
        raise GatherError(
            f"Replicas returned different values at {path}: {shown}. A {type(first).__name__} cannot be "
            "combined across shards: return a tensor with a batch dimension or a list with one item per "
            "sample, or the same value from every replica."
        )
    return first
