"""What replicas log and the metrics they update, merged into the root module once per step.

How it works: docs/internals.md, section ``lightning_gpupar/dp/replica_results.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule
from torch import Tensor
from torchmetrics import Metric

_LOG_SIGNATURE = inspect.signature(LightningModule.log)
_REDUCTIONS = {"mean": "mean", "avg": "mean", "sum": "sum", "max": "max", "min": "min"}
_REDUCTIONS_BY_FN = {torch.mean: "mean", torch.sum: "sum", torch.max: "max", torch.min: "min"}


class LogRecorder:
    """Stands in for ``LightningModule.log`` on a replica: records the call instead of logging it."""

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        bound = _LOG_SIGNATURE.bind(None, *args, **kwargs)
        bound.apply_defaults()
        call = dict(bound.arguments)
        del call["self"]
        self.calls.append(call)


def metric_pairs(
    root: LightningModule, replicas: Sequence[LightningModule]
) -> list[tuple[Metric, list[Metric]]]:
    """Each root metric with its copies in the replicas (``replicate`` keeps module order)."""
    root_metrics = [m for m in root.modules() if isinstance(m, Metric)]
    copies = [[m for m in r.modules() if isinstance(m, Metric)] for r in replicas]
    return [(metric, [c[i] for c in copies]) for i, metric in enumerate(root_metrics)]


def merge_metrics(pairs: Sequence[tuple[Metric, list[Metric]]], logged: set[int]) -> None:
    """Merge replica metric states into the root metrics, in sample order: root's, then shard 0, 1, ...

    Root metrics whose replica copies were logged (``logged`` holds the copies' ids) also get the whole
    batch's step value, which Lightning reads for ``on_step`` logging. The copies are consumed.
    """
    for root_metric, copies in pairs:
        updated = [c for c in copies if c.update_count > 0]
        if not updated:
            continue
        _check_mergeable(root_metric)
        for copy in updated:  # copies live on their replica's device; torchmetrics merges without moving
            copy.to(root_metric.device)
        step = _merge_in_order(updated)
        if any(id(c) in logged for c in copies):
            root_metric._forward_cache = step.compute()
        if root_metric.update_count > 0:
            step = _merge_in_order([root_metric, step])
        for attr in root_metric._defaults:
            setattr(root_metric, attr, getattr(step, attr))
        root_metric._update_count = step.update_count
        root_metric._computed = None


def _merge_in_order(metrics: Sequence[Metric]) -> Metric:
    """The last metric, holding every metric's state in order (``merge_state`` puts the incoming first)."""
    merged = metrics[-1]
    for metric in reversed(metrics[:-1]):
        merged._update_count += metric.update_count
        merged.merge_state(metric)
    return merged


def replay_logs(
    root: LightningModule,
    recorders: Sequence[LogRecorder],
    weights: Sequence[int],
    pairs: Sequence[tuple[Metric, list[Metric]]],
    device: torch.device,
) -> None:
    """Log every recorded name once on ``root``, combining the replicas' values (module docstring)."""
    to_root = {id(copy): root_metric for root_metric, copies in pairs for copy in copies}
    names: dict[str, list[tuple[int, dict[str, Any]]]] = {}
    for shard_size, recorder in zip(weights, recorders, strict=True):
        for call in recorder.calls:
            # a replica's explicit batch_size (e.g. a token count) weighs its value, as on one device
            weight = shard_size if call["batch_size"] is None else call["batch_size"]
            names.setdefault(call["name"], []).append((weight, call))
    for name, entries in names.items():
        call = dict(entries[0][1])
        if isinstance(call["value"], Metric):
            call["value"] = to_root[id(call["value"])]
        else:
            call["value"] = _combine(name, [(w, c["value"]) for w, c in entries], call["reduce_fx"], device)
        if any(c["batch_size"] is not None for _, c in entries):
            call["batch_size"] = sum(w for w, _ in entries)  # the whole batch's, for the epoch mean
        root.log(**call)


def logged_metric_ids(recorders: Sequence[LogRecorder]) -> set[int]:
    """Ids of the Metric objects the replicas logged."""
    return {id(c["value"]) for r in recorders for c in r.calls if isinstance(c["value"], Metric)}


def _combine(
    name: str, values: list[tuple[int, Any]], reduce_fx: Any, device: torch.device
) -> Tensor | float:
    """The replicas' values of ``name`` combined by ``reduce_fx``, without waiting for the GPU: numbers are
    combined on the host, tensors on ``device`` with the weights as Python scalars (a tensor made from a
    number on a GPU would be a host-to-device copy that blocks, once per logged value per step)."""
    reduction = _REDUCTIONS.get(reduce_fx) if isinstance(reduce_fx, str) else _REDUCTIONS_BY_FN.get(reduce_fx)
    if reduction is None:
        raise ValueError(
            f"self.log({name!r}, reduce_fx={reduce_fx!r}) under strategy=dp: values logged by replicas can "
            "be combined with reduce_fx 'mean', 'sum', 'max' or 'min' (or torch.mean/sum/max/min)."
        )
    if not any(isinstance(v, Tensor) for _, v in values):  # numbers: the host combines them
        numbers = [float(v) for _, v in values]
        if reduction == "mean":
            return sum(w * v for (w, _), v in zip(values, numbers, strict=True)) / sum(w for w, _ in values)
        return sum(numbers) if reduction == "sum" else max(numbers) if reduction == "max" else min(numbers)
    tensors = [
        v.to(device).reshape(()) if isinstance(v, Tensor) else torch.full((), float(v), device=device)
        for _, v in values
    ]
    dtype = tensors[0].dtype if tensors[0].is_floating_point() else torch.get_default_dtype()
    stacked = torch.stack([t.to(dtype) for t in tensors])
    if reduction == "mean":
        total = float(sum(w for w, _ in values))
        return torch.stack([t * (float(w) / total) for t, (w, _) in zip(stacked, values, strict=True)]).sum()
    if reduction == "sum":
        return stacked.sum()
    return stacked.max() if reduction == "max" else stacked.min()


def _check_mergeable(metric: Metric) -> None:
    if metric.full_state_update is not False or metric.dist_sync_on_step:
        raise RuntimeError(
            f"{type(metric).__name__} cannot be merged across data-parallel replicas (it declares "
            "full_state_update=True or dist_sync_on_step=True, so torchmetrics' merge_state refuses it). "
            "Update it outside the replicas (for example in on_train_batch_end from the gathered outputs), "
            "or use strategy=ddp."
        )
