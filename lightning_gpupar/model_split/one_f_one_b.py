"""The 1F1B (PipeDream-Flush) schedule in one process: each micro-batch's backward starts once its forward
has passed the last partition, so partition ``j`` of ``K`` holds at most ``K - j`` micro-batches' activations
(GPipe holds all ``M``), with the same bubble ``(K - 1) / (M + K - 1)``.

:class:`StagedPipeline` wraps a :class:`~lightning_gpupar.model_split.pipeline.Pipeline`. Inside
:meth:`StagedPipeline.run` each call of the owner runs one micro-batch through the partitions, detaching
the activations at every partition boundary; the caller's ``forward(m)`` (a ``training_step`` on
micro-batch ``m``) returns the loss to backpropagate, and the backward then runs partition by partition
with ``torch.autograd.backward(outputs, grads)`` in :func:`one_f_one_b_order`. Outside ``run`` (validation,
prediction) the GPipe pipeline runs as usual.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from lightning_gpupar.model_split.errors import PipelineError
from lightning_gpupar.model_split.pipeline import Pipeline
from lightning_gpupar.model_split.plan import PlacementPlan

#: What ``schedule=`` accepts: GPipe's fill-drain (all forwards, then all backwards) or 1F1B.
SCHEDULES = ("gpipe", "1f1b")


@functools.cache
def one_f_one_b_order(num_microbatches: int, num_partitions: int) -> tuple[tuple[str, int, int], ...]:
    """The order one process issues the work of a 1F1B step: ``("F", m, -1)`` runs micro-batch ``m``'s
    forward through every partition (and its loss), ``("B", m, j)`` partition ``j``'s backward of it.

    After forward ``n``, partition ``j`` runs the backward of micro-batch ``n - (K - 1 - j)``: the last
    partition at once, each earlier one a forward later. So partition ``j`` has run ``K - j`` forwards
    before its first backward and alternates one forward, one backward afterwards (PipeDream-Flush)."""
    order: list[tuple[str, int, int]] = []
    k = num_partitions
    for n in range(num_microbatches + k - 1):
        if n < num_microbatches:
            order.append(("F", n, -1))
        for j in reversed(range(k)):
            m = n - (k - 1 - j)
            if 0 <= m < num_microbatches:
                order.append(("B", m, j))
    return tuple(order)


@dataclass
class _MicroBatch:
    """What one micro-batch left for its backward: per partition boundary the tensors leaving partition
    ``j`` (``outputs[j]``) and the detached leaves partition ``j + 1`` received instead (``leaves[j]``)."""

    outputs: dict[int, list[Tensor]] = field(default_factory=dict)
    leaves: dict[int, list[Tensor]] = field(default_factory=dict)
    loss: Tensor | None = None
    calls: int = 0


class StagedPipeline:
    """The owner's forward: GPipe outside :meth:`run`, one detached micro-batch per call inside it."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self._current: _MicroBatch | None = None

    @property
    def num_partitions(self) -> int:
        return len(self.pipeline.partitions)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        record = self._current
        if record is None:
            return self.pipeline(*args, **kwargs)
        if record.calls:
            raise PipelineError(
                f"schedule='1f1b': one training_step called {self.pipeline.owner_name} more than once. 1F1B "
                "backpropagates each call's partitions separately and supports one call per micro-batch; "
                "use schedule='gpipe' for a step that runs the pipelined model several times."
            )
        record.calls += 1
        return self._forward(record, args, kwargs)

    def _forward(self, record: _MicroBatch, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        pipeline = self.pipeline
        if pipeline.check_first_call is not None:
            pipeline.check_first_call(args, kwargs)
            pipeline.check_first_call = None
        pipeline.calls += 1
        streams = pipeline.streams
        partitions = pipeline.partitions
        data: Any = (args, kwargs)
        ready = streams.begin([p.device for p in partitions], _devices_of(data))
        trace, index = self._trace, self._index
        for j, partition in enumerate(partitions):
            if j > 0:
                data = _detach_boundary(record, j - 1, data)
            if trace is not None:
                data, ready = trace.run(
                    pipeline._run, index, j, partition.device, partition, data, ready, j == 0
                )
            else:
                data, ready = pipeline._run(partition, data, ready, first=j == 0)
        output = streams.deliver(data, ready, pipeline.output_device)
        streams.end()
        return output

    _trace: Any = None
    _index: int = 0

    def run(self, num_microbatches: int, forward: Callable[[int], Tensor]) -> None:
        """One training step in 1F1B order: ``forward(m)`` runs micro-batch ``m``'s step and returns the loss
        to backpropagate (already weighted); gradients accumulate into ``.grad`` as usual."""
        records: dict[int, _MicroBatch] = {}
        roots: list[list[tuple[Tensor, Tensor | None]]] = []
        norms = self.pipeline.batch_norms
        trace = self.pipeline.trace
        self._trace = trace if trace is not None and trace.begin_call() else None
        order = one_f_one_b_order(num_microbatches, self.num_partitions)
        try:
            with norms.step() if norms is not None else contextlib.nullcontext():
                for n, (op, m, j) in enumerate(order):
                    if op == "F":
                        self._current, self._index = _MicroBatch(), m
                        try:
                            loss = forward(m)
                        finally:
                            records[m], self._current = self._current, None
                        records[m].loss = loss
                        continue
                    roots.append(self._roots(records[m], j))
                    if j == 0:
                        del records[m]
                    wave = m + self.num_partitions - 1 - j  # the forward this backward follows
                    after = order[n + 1] if n + 1 < len(order) else ("F", -1, -1)
                    if after[0] == "F" or after[1] + self.num_partitions - 1 - after[2] != wave:
                        # one wave (partitions K-1, K-2, ... after one forward) touches different partitions
                        # and micro-batches: one call runs it (on CUDA the engine's device threads run them
                        # side by side); the next wave needs this one's gradients
                        with _paused(norms):
                            _backward([pair for pairs in roots for pair in pairs])
                        roots = []
        finally:
            self._current, self._trace = None, None

    def _roots(self, record: _MicroBatch, j: int) -> list[tuple[Tensor, Tensor | None]]:
        """Where partition ``j``'s backward of a micro-batch starts: its loss (last partition), else the
        tensors it handed on, with the gradients the next partition's backward left on their leaves."""
        if j == self.num_partitions - 1:
            loss, record.loss = record.loss, None
            return [(loss, None)] if loss is not None and loss.requires_grad else []
        outputs, leaves = record.outputs.pop(j, []), record.leaves.pop(j, [])
        return [(o, leaf.grad) for o, leaf in zip(outputs, leaves, strict=True) if leaf.grad is not None]


def _backward(pairs: list[tuple[Tensor, Tensor | None]]) -> None:
    if pairs:
        torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])


def _detach_boundary(record: _MicroBatch, j: int, data: Any) -> Any:
    """Cut the autograd graph after partition ``j``: tensors that need gradients become fresh leaves."""
    outputs, leaves = record.outputs.setdefault(j, []), record.leaves.setdefault(j, [])

    def cut(t: Tensor) -> Tensor:
        if not t.requires_grad:
            return t
        leaf = t.detach().requires_grad_(True)
        outputs.append(t)
        leaves.append(leaf)
        return leaf

    return apply_to_collection(data, Tensor, cut)


@contextlib.contextmanager
def _paused(norms: Any) -> Iterator[None]:
    """Deferred BatchNorm collects nothing while a recomputed stage runs its forward again in backward."""
    if norms is None:
        yield
        return
    collecting, norms.collecting = norms.collecting, False
    try:
        yield
    finally:
        norms.collecting = collecting


def _devices_of(data: Any) -> list[torch.device]:
    found: dict[torch.device, None] = {}
    apply_to_collection(data, Tensor, lambda t: found.setdefault(t.device))
    return list(found)


def install_staged(handle: Any) -> StagedPipeline:
    """Put a :class:`StagedPipeline` over the pipeline a :class:`PipelineHandle` installed (its ``remove``
    restores the owner's own forward as before)."""
    staged = StagedPipeline(handle.pipeline)
    handle.owner.__dict__["forward"] = staged
    return staged


def check_schedule(schedule: Any) -> str:
    """``schedule`` if it names a known schedule, else a :class:`PipelineError` listing them."""
    if schedule not in SCHEDULES:
        raise PipelineError(
            f"schedule={schedule!r}: write one of {', '.join(map(repr, SCHEDULES))} (how the pipeline "
            "orders micro-batches: 'gpipe' runs every forward, then every backward; '1f1b' starts each "
            "micro-batch's backward as soon as its forward left the last stage, holding fewer activations)."
        )
    return str(schedule)


def activation_factors(plan: PlacementPlan, schedule: str, chunks: int) -> dict[int, float]:
    """The share of a whole batch's activations each position holds at its peak: GPipe keeps all ``M``
    micro-batches (1.0, what the plan measured on the example batch), 1F1B ``min(K - i, M) / M`` on the
    ``i``-th of ``K`` partitions (positions in the order the plan's entries first use them)."""
    order = list(dict.fromkeys(entry.position for entry in plan.entries))
    if schedule != "1f1b" or chunks <= 1:
        return dict.fromkeys(order, 1.0)
    k = len(order)
    return {position: min(k - i, chunks) / chunks for i, position in enumerate(order)}


def plan_for_schedule(plan: PlacementPlan, schedule: str, chunks: int) -> PlacementPlan:
    """``plan`` with each entry's activations scaled to what its stage holds under ``schedule``."""
    factors = activation_factors(plan, schedule, chunks)
    source = plan.sources.get("activations", "not counted")
    if chunks <= 1 or not source.startswith("measured"):
        return plan
    if all(f == 1.0 for f in factors.values()):
        note = f"; schedule {schedule}, M={chunks}: every stage holds all {chunks} micro-batches"
        return dataclasses.replace(plan, sources={**plan.sources, "activations": source + note})
    entries = tuple(
        dataclasses.replace(
            e,
            memory=dataclasses.replace(
                e.memory, activations=round(e.memory.activations * factors[e.position])
            ),
        )
        for e in plan.entries
    )
    held = ", ".join(f"position {p}: {round(f * chunks)}" for p, f in factors.items())
    note = f"; schedule 1f1b, M={chunks}: micro-batches alive per stage ({held}) = min(K - i, M)"
    return dataclasses.replace(plan, entries=entries, sources={**plan.sources, "activations": source + note})
