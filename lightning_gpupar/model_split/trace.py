"""A picture of the pipeline's schedule: when each partition ran each micro-batch, forward and backward.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/trace.py``.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

#: Calls of the pipeline recorded after the first (warm-up) one.
TRACED_STEPS = 3


@dataclass
class Span:
    """One box of the timeline: a partition ran a micro-batch's forward or backward (perf_counter s)."""

    step: int
    phase: str  # "forward" or "backward"
    partition: int
    device: str
    microbatch: int
    start: float
    end: float
    #: CUDA: the events marking the span's start(s) and end(s); start and end are set from them at finish
    events: tuple[list[torch.cuda.Event], list[torch.cuda.Event]] | None = None


class PipelineTrace:
    """Record a few pipeline steps and write the trace, the timeline and the numbers (module doc)."""

    def __init__(self, path: str | Path, steps: int = TRACED_STEPS, warmup: int = 1) -> None:
        base = Path(path)
        self.json_path = base.with_suffix(".json")
        self.png_path = base.with_suffix(".png")
        self.steps, self.warmup = steps, warmup
        self.spans: list[Span] = []
        self.calls = 0
        self.done = False
        self.profiler: torch.profiler.profile | None = None
        self._step = -1
        self._recording = False
        self._marks: dict[torch.device, list[torch.cuda.Event]] = {}  # the running forward's CUDA events
        self._references: dict[tuple[int, torch.device], tuple[float, torch.cuda.Event]] = {}

    # -------------------------------------------------------------------------------------- recording

    def begin_call(self, devices: Iterable[torch.device] = ()) -> bool:
        """Called at each pipeline call: whether to record this one (training calls only)."""
        self._recording = False
        if self.done or not torch.is_grad_enabled():
            return False
        self.calls += 1
        if self.calls <= self.warmup:
            return False
        if self.calls > self.warmup + self.steps:
            self.finish()
            return False
        if self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities)
            self.profiler.__enter__()
        self._step = self.calls - self.warmup - 1
        for device in dict.fromkeys(d for d in devices if d.type == "cuda"):
            torch.cuda.synchronize(device)  # the device is idle: its next event fires now
            reference = _event(device)
            self._references[(self._step, device)] = (time.perf_counter(), reference)
        self._recording = True
        return True

    def mark_start(self, device: torch.device) -> None:
        """Inside a partition's compute stream, before its stages (CUDA: records an event)."""
        if self._recording and device.type == "cuda":
            self._marks[device] = [_event(device)]

    def mark_end(self, device: torch.device) -> None:
        if self._recording and device.type == "cuda" and device in self._marks:
            self._marks[device].append(_event(device))

    def run(
        self, run: Callable[..., tuple[Any, Any]], i: int, j: int, device: torch.device, *args: Any
    ) -> tuple[Any, Any]:
        """``run(*args)`` (partition ``j`` on micro-batch ``i``), timed and labelled; its backward watched."""
        inputs = _grad_nodes(args[1])
        with torch.profiler.record_function(f"pipeline forward p{j} mb{i}"):
            start = time.perf_counter()
            result = run(*args)
            end = time.perf_counter()
        span = Span(self._step, "forward", j, str(device), i, start, end)
        marks = self._marks.pop(device, [])
        if device.type == "cuda" and len(marks) == 2:
            span.events = ([marks[0]], [marks[1]])
        self.spans.append(span)
        backward = Span(self._step, "backward", j, str(device), i, 0.0, 0.0)
        if device.type == "cuda":
            backward.events = ([], [])
        self._watch_backward(result[0], inputs, backward, device)
        return result

    def _watch_backward(
        self, outputs: Any, boundary: set[Any], span: Span, device: torch.device | None = None
    ) -> None:
        """Hook every autograd node between the partition's outputs and its inputs (parameters excluded)."""
        nodes, todo = [], list(_grad_nodes(outputs))
        seen: set[Any] = set()
        while todo:
            node = todo.pop()
            if node is None or node in seen or node in boundary or type(node).__name__ == "AccumulateGrad":
                continue
            seen.add(node)
            nodes.append(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
        if not nodes:
            return
        self.spans.append(span)
        span.start, span.end = float("inf"), 0.0

        def started(*_: Any) -> None:
            span.start = min(span.start, time.perf_counter())
            if span.events is not None and device is not None:  # on the node's stream, current here
                span.events[0].append(_event(device))

        def ended(*_: Any) -> None:
            span.end = max(span.end, time.perf_counter())
            if span.events is not None and device is not None:
                span.events[1].append(_event(device))

        for node in nodes:
            node.register_prehook(started)
            node.register_hook(ended)

    # --------------------------------------------------------------------------------------- results

    def finish(self) -> None:
        """Stop recording; write the Chrome trace and the PNG, print the bubble and the utilisation."""
        if self.done:
            return
        self.done = True
        if self.profiler is None:
            return
        self.profiler.__exit__(None, None, None)
        self._gpu_times()
        spans = [s for s in self.spans if s.end >= s.start > 0]
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.profiler.export_chrome_trace(str(self.json_path))
        _add_schedule_rows(self.json_path, spans)
        lines = [f"pipeline trace: {self.json_path} (Chrome trace: open in https://ui.perfetto.dev)"]
        lines.append(_plot(spans, self.png_path))
        lines += summary(spans)
        rank_zero_info("\n".join(lines))

    def _gpu_times(self) -> None:
        """CUDA spans: start and end from their events, on the host clock (class docstring)."""
        if not self._references:
            return
        torch.cuda.synchronize()
        for span in self.spans:
            device = torch.device(span.device)
            reference = self._references.get((span.step, device))
            if span.events is None or reference is None or not all(span.events):
                continue
            host, event = reference
            starts = [host + event.elapsed_time(e) / 1e3 for e in span.events[0]]
            ends = [host + event.elapsed_time(e) / 1e3 for e in span.events[1]]
            span.start, span.end = min(starts), max(ends)
            span.events = None


def _event(device: torch.device) -> torch.cuda.Event:
    """A timing event recorded now on ``device``'s current stream."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


def utilisation(spans: Iterable[Span]) -> dict[int, float]:
    """Each partition's busy share of its steps (step: first start to last end), averaged over steps."""
    by_step: dict[int, list[Span]] = {}
    for span in spans:
        by_step.setdefault(span.step, []).append(span)
    shares: dict[int, list[float]] = {}
    for step_spans in by_step.values():
        window = max(s.end for s in step_spans) - min(s.start for s in step_spans)
        for partition in sorted({s.partition for s in step_spans}):
            busy = sum(s.end - s.start for s in step_spans if s.partition == partition)
            shares.setdefault(partition, []).append(busy / window if window > 0 else 0.0)
    return {p: statistics.mean(v) for p, v in sorted(shares.items())}


def summary(spans: list[Span]) -> list[str]:
    """The printed numbers: measured bubble fraction and per-partition utilisation."""
    if not spans:
        return ["no pipeline step was recorded (the trace needs training steps through the pipeline)"]
    shares = utilisation(spans)
    k = len(shares)
    m = len({s.microbatch for s in spans})
    devices = {s.partition: s.device for s in spans}
    lines = [
        f"measured bubble fraction: {1 - statistics.mean(shares.values()):.1%} "
        f"(GPipe's (K-1)/(M+K-1) with K={k}, M={m}: {(k - 1) / (m + k - 1):.1%}; partitions that share "
        "a device take turns, so they idle more)"
    ]
    lines += [f"  partition {p} ({devices[p]}): busy {share:.1%} of the step" for p, share in shares.items()]
    return lines


def _grad_nodes(data: Any) -> set[Any]:
    found: set[Any] = set()
    apply_to_collection(data, Tensor, lambda t: found.add(t.grad_fn) if t.grad_fn is not None else None)
    return found


def _add_schedule_rows(path: Path, spans: list[Span]) -> None:
    """Append the schedule (one row per partition) to the profiler's Chrome trace, on its clock."""
    trace = json.loads(path.read_text())
    events = trace.get("traceEvents", [])
    labelled = {
        e["name"]: float(e["ts"]) for e in events if str(e.get("name", "")).startswith("pipeline forward")
    }
    offsets = [
        labelled[f"pipeline forward p{s.partition} mb{s.microbatch}"] - s.start * 1e6
        for s in spans
        if s.phase == "forward"
        and s.step == 0
        and f"pipeline forward p{s.partition} mb{s.microbatch}" in labelled
    ]
    offset = statistics.median(offsets) if offsets else 0.0
    pid = "pipeline schedule"
    events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": pid}})
    for partition in sorted({s.partition for s in spans}):
        name = f"partition {partition}"
        events.append(
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": partition, "args": {"name": name}}
        )
    for s in spans:
        events.append(
            {
                "ph": "X",
                "name": f"{'F' if s.phase == 'forward' else 'B'}{s.microbatch}",
                "cat": s.phase,
                "pid": pid,
                "tid": s.partition,
                "ts": s.start * 1e6 + offset,
                "dur": (s.end - s.start) * 1e6,
                "args": {"step": s.step, "device": s.device, "microbatch": s.microbatch},
            }
        )
    trace["traceEvents"] = events
    path.write_text(json.dumps(trace))


def _plot(spans: list[Span], path: Path) -> str:
    """Draw the first recorded step; returns the line to print."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "no timeline picture: matplotlib is missing (pip install 'lightning-gpupar[plot]')"
    first = [s for s in spans if s.step == min((s.step for s in spans), default=0)]
    if not first:
        return "no timeline picture: nothing was recorded"
    origin = min(s.start for s in first)
    partitions = sorted({s.partition for s in first})
    devices = {s.partition: s.device for s in first}
    colours = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(partitions) + 1.2), dpi=80)
    for s in first:
        row = len(partitions) - 1 - partitions.index(s.partition)
        left, width = (s.start - origin) * 1e3, (s.end - s.start) * 1e3
        colour = colours(s.microbatch % 10)
        backward = s.phase == "backward"
        ax.broken_barh(
            [(left, width)],
            (row - 0.4, 0.8),
            facecolors=colour,
            edgecolor="black",
            hatch="//" if backward else None,
            alpha=0.6 if backward else 1.0,
        )
        ax.text(
            left + width / 2,
            row,
            f"{'B' if backward else 'F'}{s.microbatch}",
            ha="center",
            va="center",
            fontsize=7,
        )
    ax.set_yticks(range(len(partitions)))
    ax.set_yticklabels([f"p{p} {devices[p]}" for p in reversed(partitions)])
    ax.set_xlabel("ms since the step's first forward")
    ax.set_title("pipeline schedule: forward (solid) and backward (hatched) per micro-batch", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return f"pipeline timeline: {path}"
