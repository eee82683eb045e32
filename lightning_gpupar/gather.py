"""Gather per-replica step outputs onto one device, as if the step had seen the whole batch.

* tensors with a batch dimension are concatenated along dim 0, in shard order, so per-sample outputs
  (predictions) come back in the original sample order;
* scalars (0-dim tensors and Python numbers, the loss among them) are means over shards weighted by shard
  size, which equals the full-batch mean of a per-sample mean;
* dicts, lists, tuples and namedtuples are gathered item by item; anything else is taken from the first
  replica.

Gathering is differentiable: the loss gathered here backpropagates into every replica.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor


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
    return _gather(list(outputs), [s / sum(sizes) for s in sizes], device)


def _gather(values: list[Any], weights: list[float], device: torch.device) -> Any:
    first = values[0]
    if isinstance(first, Tensor):
        if first.dim() == 0:
            return sum(w * v.to(device) for w, v in zip(weights, values, strict=True))
        return torch.cat([v.to(device) for v in values])
    if isinstance(first, bool):
        return first
    if isinstance(first, int | float):
        return float(sum(w * v for w, v in zip(weights, values, strict=True)))
    if isinstance(first, Mapping):
        gathered = {key: _gather([v[key] for v in values], weights, device) for key in first}
        return gathered if type(first) is dict else type(first)(gathered)  # type: ignore[call-arg]
    if isinstance(first, Sequence) and not isinstance(first, str):
        items = [_gather([v[i] for v in values], weights, device) for i in range(len(first))]
        if hasattr(first, "_fields"):  # namedtuple
            return type(first)(*items)
        return type(first)(items)  # type: ignore[call-arg]
    return first
