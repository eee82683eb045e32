"""A GPipe micro-batch pipeline over a sequence of stages placed on devices.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/pipeline.py``.
"""

from __future__ import annotations

import contextlib
import functools
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint as recompute_in_backward

from lightning_gpupar.dp.batch import BatchSplitError, split_call
from lightning_gpupar.dp.gather import gather_outputs
from lightning_gpupar.dp.parallel_apply import StopIterationAsError
from lightning_gpupar.model_split.batchnorm import DeferredBatchNorms, batch_norms
from lightning_gpupar.model_split.chain_check import check_stage_chain
from lightning_gpupar.model_split.errors import PipelineError, PlacementError
from lightning_gpupar.model_split.hooks import all_on
from lightning_gpupar.model_split.paths import (
    common_ancestor,
    expand_paths,
    holds_tensors,
    is_within,
    join,
    uncovered,
)
from lightning_gpupar.model_split.plan import PlacementPlan
from lightning_gpupar.model_split.trace import PipelineTrace

#: What the user-facing ``checkpoint=`` option accepts: the stages that recompute their activations in
#: backward instead of keeping them (torch's and torchgpipe's "activation checkpointing"; called *recompute*
#: in this code, so that "checkpoint" keeps meaning the files of :mod:`lightning_gpupar.checkpoint`):
#: nothing, every stage (``True`` / ``"all"``), or the listed stage paths.
Recompute = bool | str | Sequence[str] | None


def gpipe_schedule(num_microbatches: int, num_partitions: int) -> list[list[tuple[int, int]]]:
    """Clock ticks of the fill-drain schedule: tick ``t`` runs every ``(micro-batch i, partition j)`` with
    ``i + j == t``. There are ``M + K - 1`` ticks, of which each partition idles ``K - 1``: the bubble."""
    return [
        [(t - j, j) for j in range(num_partitions) if 0 <= t - j < num_microbatches]
        for t in range(num_microbatches + num_partitions - 1)
    ]


@dataclass(frozen=True)
class Partition:
    """Consecutive stages on one device; ``recomputed[k]``: recompute stage k's activations in backward.

    Consecutive recomputed stages form one *segment*, checkpointed as a whole (torchgpipe checkpoints a
    whole partition, so ``checkpoint="all"`` recomputes each partition once per micro-batch)."""

    position: int
    device: torch.device
    stages: tuple[Callable[..., Any], ...]
    recomputed: tuple[bool, ...]
    paths: tuple[str, ...] = ()  #: the stages' paths, for messages

    def names(self) -> str:
        """How messages name the stages: ``blocks.2 (Block), blocks.3 (Block)``."""
        return self._names

    @functools.cached_property
    def _names(self) -> str:  # computed once: every micro-batch's run names its partition
        named = []
        for k, stage in enumerate(self.stages):
            module = getattr(stage, "__self__", stage)  # a bound forward: its module
            named.append(f"{self.paths[k] if k < len(self.paths) else '?'} ({type(module).__name__})")
        return ", ".join(named)

    def segments(self) -> list[tuple[tuple[Callable[..., Any], ...], bool]]:
        """The stages grouped into maximal runs of equal ``recomputed``, in order: (stages, recomputed)."""
        return self._segments

    @functools.cached_property
    def _segments(self) -> list[tuple[tuple[Callable[..., Any], ...], bool]]:
        runs: list[tuple[tuple[Callable[..., Any], ...], bool]] = []
        for stage, recomputed in zip(self.stages, self.recomputed, strict=True):
            if runs and runs[-1][1] == recomputed:
                runs[-1] = ((*runs[-1][0], stage), recomputed)
            else:
                runs.append(((stage,), recomputed))
        return runs


def run_partition(partition: Partition, data: Any, first: bool) -> Any:
    """One micro-batch through one partition's stages; ``first``: ``data`` is the owner's ``(args, kwargs)``.

    Recomputed segments are checkpointed only while training with gradients on (in eval mode, or under
    ``no_grad``, there is no backward to save memory for: torchgpipe turns checkpointing off too)."""
    for stages, recomputed in partition.segments():
        args, kwargs = data if first else ((data,), {})
        first = False
        if recomputed and torch.is_grad_enabled() and _training(stages[0]):
            data = recompute_in_backward(_chain_on_copies, stages, *args, use_reentrant=False, **kwargs)
        else:
            data = _chain(stages, *args, **kwargs)
    return data


def _chain(stages: Sequence[Callable[..., Any]], *args: Any, **kwargs: Any) -> Any:
    """``stages[-1](... stages[1](stages[0](*args, **kwargs)))``."""
    data = stages[0](*args, **kwargs)
    for stage in stages[1:]:
        data = stage(data)
    return data


def _chain_on_copies(stages: Sequence[Callable[..., Any]], *args: Any, **kwargs: Any) -> Any:
    """:func:`_chain` on copies of the tensors it receives. A recomputed segment runs twice on its input;
    an in-place operation on it (``ReLU(inplace=True)`` right after a hand-off) would change the input of
    the second run (autograd refuses: "modified by an inplace operation"). The copies are made inside the
    checkpoint, so nothing more is kept for backward."""
    args, kwargs = apply_to_collection((args, kwargs), Tensor, lambda t: t.clone())
    return _chain(stages, *args, **kwargs)


def _training(stage: Callable[..., Any]) -> bool:
    """The training flag of a stage: a module, or the bound ``forward`` of one (a stage owner)."""
    module = stage if isinstance(stage, nn.Module) else getattr(stage, "__self__", None)
    return bool(getattr(module, "training", True))


class Pipeline:
    """Call the partitions on ``chunks`` micro-batches in GPipe order; outputs land on ``output_device``."""

    def __init__(
        self,
        partitions: Sequence[Partition],
        chunks: int,
        output_device: torch.device,
        check_first_call: Callable[[Any, Any], None] | None = None,
        owner_name: str = "the stage owner",
        batch_norms: DeferredBatchNorms | None = None,
        trace: PipelineTrace | None = None,
    ) -> None:
        if chunks < 1:
            raise PipelineError(f"chunks={chunks}: the number of micro-batches must be >= 1.")
        self.partitions = tuple(partitions)
        self.chunks = chunks
        self.output_device = output_device
        self.check_first_call = check_first_call
        self.owner_name = owner_name
        self.streams = DeviceStreams()
        self.batch_norms = batch_norms  #: deferred BatchNorm layers: statistics committed once per call
        self.trace = trace  #: records a few steps' schedule (``trace=PATH``)
        self.calls = 0  #: how many batches ran through the pipeline

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        try:
            shards, sizes = split_call(args, kwargs, self.chunks)
        except BatchSplitError as err:
            raise PipelineError(
                f"chunks={self.chunks}: the pipeline splits every tensor {self.owner_name} receives along "
                f"dim 0 into micro-batches, so all of them need the same batch dimension. {err} "
                "(docs/pipeline.md)"
            ) from err
        if self.check_first_call is not None:
            with StopIterationAsError(f"the stage chain check of {self.owner_name}"):
                self.check_first_call(*shards[0])
            self.check_first_call = None
        self.calls += 1
        streams = self.streams
        start = streams.begin([p.device for p in self.partitions], _devices_of(shards[0]))
        data: list[Any] = list(shards)
        ready: list[torch.cuda.Event | None] = [start] * len(shards)  # data[i] is valid once ready[i] fired
        norms = self.batch_norms.step() if self.batch_norms is not None else contextlib.nullcontext()
        devices = [p.device for p in self.partitions]
        trace = self.trace if self.trace is not None and self.trace.begin_call(devices) else None
        with norms:  # commits the deferred BatchNorm statistics at its end, on the caller's stream ...
            for tick in gpipe_schedule(len(shards), len(self.partitions)):
                for i, j in tick:
                    p = self.partitions[j]
                    if trace is not None:
                        data[i], ready[i] = trace.run(self._run, i, j, p.device, p, data[i], ready[i], j == 0)
                    else:
                        data[i], ready[i] = self._run(p, data[i], ready[i], first=j == 0)
            outputs = [streams.deliver(d, r, self.output_device) for d, r in zip(data, ready, strict=True)]
            streams.end()  # ... so first the caller's streams wait for the streams that computed them
        return gather_outputs(outputs, sizes, self.output_device)

    def _run(
        self, partition: Partition, data: Any, ready: torch.cuda.Event | None, first: bool
    ) -> tuple[Any, torch.cuda.Event | None]:
        """Run one micro-batch through one partition; returns its output and the event that marks it done."""
        data, ready = self.streams.transfer(data, ready, partition.device)
        where = f"pipeline stage {partition.names()} on {partition.device}"
        with self.streams.compute(partition.device, data, ready), StopIterationAsError(where):
            if self.trace is not None:  # on CUDA: an event once the compute stream has its input
                self.trace.mark_start(partition.device)
            data = run_partition(partition, data, first)
            if self.trace is not None:
                self.trace.mark_end(partition.device)
        return data, self.streams.record(partition.device)


class DeviceStreams:
    """The CUDA side of a pipeline; for devices other than CUDA every method does nothing but move data.

    Each CUDA device gets, once, a *compute* stream, where its partitions run, and a *copy* stream, where
    activations entering or leaving it are copied (torch copies between two GPUs on the source device's
    current stream, after a barrier with the destination's: on the compute streams that barrier would make
    partition ``j - 1`` wait for partition ``j``'s queued work). A micro-batch travels with the event
    after which its tensors are valid:

    - :meth:`transfer`: the copy streams wait for the event, copy, and record the copy's own event;
    - :meth:`compute`: the compute stream waits for the event, runs the stages; :meth:`record` marks the end.

    Events, not whole-stream waits: when micro-batch ``i`` leaves partition ``j - 1``, that partition's
    stream already holds micro-batch ``i + 1`` (the schedule queues it first in the same tick), and the
    copy must not wait for it. Memory allocated on one stream and read on another is marked with
    ``record_stream``, so the allocator does not reuse it before the reader is done.
    """

    def __init__(self) -> None:
        self.compute_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.copy_streams: dict[torch.device, torch.cuda.Stream] = {}

    def begin(
        self, devices: Sequence[torch.device], sources: Sequence[torch.device]
    ) -> torch.cuda.Event | None:
        """Compute streams wait for the caller's work so far (e.g. the optimizer's updates of the
        parameters); returns the event after which the input, on ``sources``, is valid."""
        for device in dict.fromkeys(devices):
            if device.type == "cuda":
                self._compute(device).wait_stream(torch.cuda.current_stream(device))
        cuda = [d for d in sources if d.type == "cuda"]
        if len(cuda) > 1:  # an input spread over GPUs: one stream that waits for all of them
            for device in cuda[1:]:
                torch.cuda.current_stream(cuda[0]).wait_stream(torch.cuda.current_stream(device))
        return torch.cuda.current_stream(cuda[0]).record_event() if cuda else None

    def transfer(
        self, data: Any, ready: torch.cuda.Event | None, device: torch.device
    ) -> tuple[Any, torch.cuda.Event | None]:
        """Move ``data`` (valid once ``ready`` fired) to ``device``; returns it and the event of the copy."""
        if all_on(data, device):
            return data, ready
        sources = [d for d in _devices_of(data) if d != device]
        if not sources:
            return data, ready
        ends = [d for d in dict.fromkeys([device, *sources]) if d.type == "cuda"]
        with contextlib.ExitStack() as stack:
            for end in ends:  # the copy streams of both ends are current during the copy
                stack.enter_context(torch.cuda.stream(self._copy(end)))
                if ready is not None:
                    self._copy(end).wait_event(ready)
                _keep_for(data, self._copy(end))  # the source's tensors are read on its copy stream
            moved = move_data_to_device(data, device)  # a copy to the CPU synchronises: done on return
            done = self._copy(device).record_event() if device.type == "cuda" else None
        return moved, done

    @contextlib.contextmanager
    def compute(self, device: torch.device, data: Any, ready: torch.cuda.Event | None) -> Iterator[None]:
        """Run the block on ``device``'s compute stream, once ``data`` is valid."""
        if device.type != "cuda":
            yield
            return
        stream = self._compute(device)
        _hand_over(data, ready, stream)
        with torch.cuda.stream(stream):
            yield

    def record(self, device: torch.device) -> torch.cuda.Event | None:
        """The event marking the end of the work queued so far on ``device``'s compute stream."""
        return self._compute(device).record_event() if device.type == "cuda" else None

    def deliver(self, data: Any, ready: torch.cuda.Event | None, device: torch.device) -> Any:
        """Move an output to ``device`` for the caller: its current stream waits until the output is valid."""
        data, ready = self.transfer(data, ready, device)
        if device.type == "cuda":  # end(), called next, implies the wait; kept so deliver stands alone
            _hand_over(data, ready, torch.cuda.current_stream(device))
        return data

    def end(self) -> None:
        """The caller's streams wait for everything the pipeline queued (nothing blocks the host)."""
        for stream in (*self.compute_streams.values(), *self.copy_streams.values()):
            torch.cuda.current_stream(stream.device).wait_stream(stream)

    def _compute(self, device: torch.device) -> torch.cuda.Stream:
        return _stream(self.compute_streams, device)

    def _copy(self, device: torch.device) -> torch.cuda.Stream:
        return _stream(self.copy_streams, device)


def _stream(streams: dict[torch.device, torch.cuda.Stream], device: torch.device) -> torch.cuda.Stream:
    """The stream of ``device`` in ``streams``, created on first use (and kept: created once)."""
    if device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in streams:
        streams[device] = torch.cuda.Stream(device)
    return streams[device]


def _hand_over(data: Any, ready: torch.cuda.Event | None, stream: torch.cuda.Stream) -> None:
    """``stream`` waits until ``data`` is valid, and ``data``'s memory lives until ``stream`` used it."""
    if ready is not None:
        stream.wait_event(ready)
    _keep_for(data, stream)


def _keep_for(data: Any, stream: torch.cuda.Stream) -> None:
    """Keep the memory of ``data``'s tensors on ``stream``'s device until ``stream``'s queued work is done."""
    _apply_tensors(data, lambda t: t.record_stream(stream) if t.device == stream.device else None)


def _apply_tensors(data: Any, fn: Callable[[Tensor], Any]) -> None:
    apply_to_collection(data, Tensor, fn)


def _devices_of(data: Any) -> list[torch.device]:
    """The devices of ``data``'s tensors, in order of appearance."""
    found: dict[torch.device, None] = {}
    _apply_tensors(data, lambda t: found.setdefault(t.device))
    return list(found)


# ------------------------------------------------------------------------------------------ installing


class PipelineHandle:
    """Undo :func:`install_pipeline`: the owner gets its own ``forward`` back."""

    def __init__(self, owner: nn.Module, previous: Any, pipeline: Pipeline) -> None:
        self.owner, self.previous, self.pipeline = owner, previous, pipeline

    def remove(self) -> None:
        if self.pipeline.batch_norms is not None:
            self.pipeline.batch_norms.remove()
        if self.pipeline.trace is not None:
            self.pipeline.trace.finish()
        self.owner.__dict__.pop("forward", None)
        if self.previous is not None:
            self.owner.__dict__["forward"] = self.previous


def stage_owner(stages: Sequence[str]) -> str:
    """The module a stage sequence replaces the forward of: the stages' common parent (or the one stage)."""
    return stages[0] if len(stages) == 1 else common_ancestor(stages)


def install_pipeline(
    root: nn.Module,
    plan: PlacementPlan,
    stages: Sequence[str],
    chunks: int,
    recompute: Recompute = None,
    deferred_batch_norm: bool = True,
    trace: str | None = None,
) -> PipelineHandle:
    """Check the stage sequence against the model and the plan, then pipeline the owner's forward.

    ``deferred_batch_norm``: with ``chunks > 1``, BatchNorm layers in the stages update their running
    statistics once per batch from all micro-batches (:mod:`~lightning_gpupar.model_split.batchnorm`).
    ``trace``: a path; record a few steps' schedule there (:mod:`~lightning_gpupar.model_split.trace`).
    """
    paths = _stage_paths(root, stages)
    if not paths:
        raise PipelineError(
            f"chunks={chunks} pipelines a sequence of stages, but there are none: no stages were given. "
            "Declare them (name the stages: strategy.stages=[...], or the placement's keys in the order the "
            "forward calls them), or use chunks=1."
        )
    owner_path = stage_owner(paths)
    owner = root.get_submodule(owner_path)
    _check_sequence(root, owner_path, owner, paths)
    recomputed = _recomputed_stages(root, paths, recompute)
    previous = owner.__dict__.get("forward")
    norms = batch_norms(root.get_submodule(p) for p in paths)
    tracked = [n for n in norms if n.track_running_stats]  # the others have no statistics to defer
    deferred = DeferredBatchNorms(tracked) if tracked and chunks > 1 and deferred_batch_norm else None
    callables: list[Callable[..., Any]] = [root.get_submodule(p) for p in paths]
    if paths == [owner_path]:
        # micro-batching one module: its forward is the stage, read after the deferral of BatchNorm
        # statistics replaced it on a BatchNorm owner (the pipeline then replaces it in turn)
        callables = [owner.forward]
    partitions: list[Partition] = []
    for path, stage, position in zip(paths, callables, _positions(plan, paths), strict=True):
        if partitions and partitions[-1].position == position:
            last = partitions[-1]
            partitions[-1] = Partition(
                position,
                last.device,
                (*last.stages, stage),
                (*last.recomputed, path in recomputed),
                (*last.paths, path),
            )
        else:
            device = plan.devices[position]
            partitions.append(Partition(position, device, (stage,), (path in recomputed,), (path,)))
    if norms and chunks > 1 and not deferred_batch_norm:
        warnings.warn(
            f"chunks={chunks} with BatchNorm in the pipelined stages: each micro-batch is normalised on its "
            "own statistics and running statistics update once per micro-batch, so training differs from "
            "the unsplit model. Leave deferred_batch_norm on, prefer GroupNorm/LayerNorm, or use chunks=1.",
            stacklevel=2,
        )
    name = _owner_name(owner_path, owner)
    check = None
    if not isinstance(owner, nn.Sequential) and paths != [owner_path]:
        original = previous or type(owner).forward.__get__(owner)
        stage_modules = [(p, root.get_submodule(p)) for p in paths]
        check = functools.partial(check_stage_chain, name, original, stage_modules)
    tracer = PipelineTrace(trace) if trace else None
    pipeline = Pipeline(
        partitions, chunks, plan.output_device, check, owner_name=name, batch_norms=deferred, trace=tracer
    )
    owner.__dict__["forward"] = pipeline
    return PipelineHandle(owner, previous, pipeline)


def _owner_name(owner_path: str, owner: nn.Module) -> str:
    """How messages name the module whose forward the pipeline replaces: ``model (TransformerNet)``."""
    return f"{owner_path or 'the LightningModule'} ({type(owner).__name__})"


def _stage_paths(root: nn.Module, stages: Sequence[str]) -> list[str]:
    paths: list[str] = []
    for path in expand_paths(root, stages):
        module = root.get_submodule(path)
        if isinstance(module, nn.ModuleList | nn.ModuleDict):  # never called itself: its items are the stages
            paths += [join(path, name) for name, _ in module.named_children()]
        else:
            paths.append(path)
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise PipelineError(f"Stages {duplicates} appear more than once in the stage sequence {paths}.")
    return paths


def _check_sequence(root: nn.Module, owner_path: str, owner: nn.Module, paths: list[str]) -> None:
    """The owner's forward must be exactly the chain of the stages: nothing with tensors left out."""
    name = _owner_name(owner_path, owner)
    declare = (
        f"Declare the stage sequence: every stage of {owner_path or 'the model'} in the order its forward "
        "calls them, e.g. strategy.placement={model.embed:0,model.blocks.0-1:0,model.blocks.2-3:1,"
        "model.head:1} or strategy.stages=[model.embed,model.blocks,model.head]."
    )
    if paths == [owner_path]:
        return
    if isinstance(owner, nn.ModuleList | nn.ModuleDict):
        raise PipelineError(
            f"chunks > 1 needs a stage sequence, but the stages {paths} share the parent {name}, which is "
            f"never called itself. {declare}"
        )
    if isinstance(owner, nn.Sequential):
        expected = [join(owner_path, n) for n, m in owner._modules.items() if m is not None]  # shared too
        if paths != expected:
            raise PipelineError(
                f"{name} is an nn.Sequential: its stages are {expected}, in that order; got {paths}."
            )
        return
    if holds_tensors(owner, recurse=False):
        raise PipelineError(f"chunks > 1: {name} owns tensors: it is not only a chain of stages.")
    prefix = len(owner_path) + 1 if owner_path else 0
    missing = [join(owner_path, p) or name for p, _ in uncovered(owner, {p[prefix:] for p in paths})]
    if missing:
        verb = "holds parameters and is" if len(missing) == 1 else "hold parameters and are"
        raise PipelineError(
            f"chunks > 1 needs {name} to be a sequence of stages, but {', '.join(missing)} {verb} in no "
            f"stage (stages: {paths}). {declare}"
        )


def _positions(plan: PlacementPlan, paths: Sequence[str]) -> list[int]:
    """The position each stage runs on; a stage holding no tensors (an activation) runs where its input is."""
    found = [_position(plan, path) for path in paths]
    known = [p for p in found if p is not None]
    previous = known[0] if known else plan.output_position
    positions = []
    for position in found:
        previous = position if position is not None else previous
        positions.append(previous)
    return positions


def _position(plan: PlacementPlan, path: str) -> int | None:
    """The one position a stage runs on, or ``None`` for a stage that holds no tensors."""
    position = plan.position_of(path)
    if position is not None:
        return position
    inside = {e.position for e in plan.entries if is_within(e.path, path)}
    if not inside:
        return None
    if len(inside) != 1:
        raise PipelineError(
            f"Stage {path!r} is spread over positions {sorted(inside)}; a stage must live on one device. "
            "Place it whole, or list its parts as separate stages."
        )
    return inside.pop()


def recomputed_stages(root: nn.Module, stages: Sequence[str], recompute: Recompute) -> set[str]:
    """The stage paths the ``checkpoint=`` option ``recompute`` names, checked against the stage sequence
    ``stages`` (what a pipeline over them would recompute in backward)."""
    return _recomputed_stages(root, _stage_paths(root, stages), recompute)


def _recomputed_stages(root: nn.Module, paths: list[str], recompute: Recompute) -> set[str]:
    """The stage paths whose activations are recomputed in backward (the ``checkpoint=`` option)."""
    if recompute is None or recompute is False or recompute in ("never", "none"):
        return set()
    if recompute is True or recompute in ("all", "always"):
        return set(paths)
    chosen: set[str] = set()
    unknown: list[str] = []
    for name in [recompute] if isinstance(recompute, str) else list(recompute):
        try:
            chosen.update(_stage_paths(root, [name]))
        except (PlacementError, AttributeError):  # no such submodule
            unknown.append(name)
    unknown += sorted(chosen - set(paths))
    if unknown:
        raise PipelineError(f"checkpoint names {unknown}, which are not stages; the stages are {paths}.")
    return chosen
