"""A GPipe micro-batch pipeline over a sequence of stages placed on devices.

A stage sequence is an ordered list of submodules whose common parent (the *owner*) computes
``stage_n(... stage_2(stage_1(*args, **kwargs)))``: an ``nn.Sequential``, or a module such as
``embed -> blocks[0..n) -> head`` whose forward loops over a ``ModuleList``. Each stage takes the previous
stage's output as its one positional argument. Consecutive stages on one device position form a
*partition*.

:func:`install_pipeline` replaces the owner's ``forward`` with a :class:`Pipeline`: the input is split
along dim 0 into ``chunks`` micro-batches, partition ``j`` runs micro-batch ``i`` at clock tick ``i + j``
(GPipe's fill-drain schedule), and the outputs are gathered as dp gathers them
(:mod:`lightning_gpupar.gather`: per-sample tensors concatenated in order). The caller computes its loss
on the full output, so autograd's backward equals the unsplit model's. On CUDA each device works on its
own stream, so partitions on different GPUs overlap; on the CPU the same schedule runs in order.

Caveats: BatchNorm normalises each micro-batch separately and updates its running statistics once per
micro-batch, so a model with BatchNorm in training mode is not equivalent to the unsplit model for
``chunks > 1`` (use GroupNorm / LayerNorm, or ``chunks=1``). Every tensor the owner receives must share
its batch dimension.
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
from torch.utils.checkpoint import checkpoint as recompute

from lightning_gpupar.batch import split_batch
from lightning_gpupar.gather import gather_outputs
from lightning_gpupar.placement import (
    PlacementError,
    PlacementPlan,
    common_ancestor,
    expand_paths,
    holds_tensors,
    is_within,
    join,
    uncovered,
)
from lightning_gpupar.stage_check import check_stage_chain

#: ``checkpoint=`` values: nothing, every stage, or the listed stage paths are recomputed in backward.
Checkpoint = bool | str | Sequence[str] | None


class PipelineError(PlacementError):
    """A stage sequence that cannot be pipelined; the message says which stage and what to declare."""


def gpipe_schedule(num_microbatches: int, num_partitions: int) -> list[list[tuple[int, int]]]:
    """Clock ticks of the fill-drain schedule: tick ``t`` runs every ``(micro-batch i, partition j)`` with
    ``i + j == t``. There are ``M + K - 1`` ticks, of which each partition idles ``K - 1``: the bubble."""
    return [
        [(t - j, j) for j in range(num_partitions) if 0 <= t - j < num_microbatches]
        for t in range(num_microbatches + num_partitions - 1)
    ]


@dataclass(frozen=True)
class Partition:
    """Consecutive stages on one device; ``checkpointed[k]``: recompute stage k's activations in backward."""

    position: int
    device: torch.device
    stages: tuple[Callable[..., Any], ...]
    checkpointed: tuple[bool, ...]


class Pipeline:
    """Call the partitions on ``chunks`` micro-batches in GPipe order; outputs land on ``output_device``."""

    def __init__(
        self,
        partitions: Sequence[Partition],
        chunks: int,
        output_device: torch.device,
        check_first_call: Callable[[Any, Any], None] | None = None,
    ) -> None:
        if chunks < 1:
            raise PipelineError(f"chunks={chunks}: the number of micro-batches must be >= 1.")
        self.partitions = tuple(partitions)
        self.chunks = chunks
        self.output_device = output_device
        self.check_first_call = check_first_call

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        shards, sizes = split_batch((args, kwargs), self.chunks)
        if self.check_first_call is not None:
            self.check_first_call(*shards[0])
            self.check_first_call = None
        streams = _Streams([p.device for p in self.partitions])
        streams.start()
        data: list[Any] = list(shards)
        for tick in gpipe_schedule(len(shards), len(self.partitions)):
            for i, j in tick:
                data[i] = self._run(self.partitions[j], data[i], first=j == 0, streams=streams)
        with streams.use(self.partitions[-1].device, self.output_device):
            outputs = [move_data_to_device(d, self.output_device) for d in data]
        streams.finish(self.output_device, outputs)
        return gather_outputs(outputs, sizes, self.output_device)

    @staticmethod
    def _run(partition: Partition, data: Any, first: bool, streams: _Streams) -> Any:
        with streams.use(_device_of(data), partition.device):
            data = move_data_to_device(data, partition.device)
            steps = zip(partition.stages, partition.checkpointed, strict=True)
            for k, (stage, checkpointed) in enumerate(steps):
                args, kwargs = data if first and k == 0 else ((data,), {})
                if checkpointed:
                    data = recompute(stage, *args, use_reentrant=False, **kwargs)
                else:
                    data = stage(*args, **kwargs)
        return data


class _Streams:
    """One side stream per CUDA device; a no-op on the CPU."""

    def __init__(self, devices: Sequence[torch.device]) -> None:
        self.streams = {d: torch.cuda.Stream(d) for d in dict.fromkeys(devices) if d.type == "cuda"}

    def start(self) -> None:
        """Side streams wait for the work queued so far (the micro-batches' source)."""
        for device, stream in self.streams.items():
            stream.wait_stream(torch.cuda.current_stream(device))

    @contextlib.contextmanager
    def use(self, *devices: torch.device | None) -> Iterator[None]:
        """Make the side streams of ``devices`` current, so a copy between them orders after both."""
        with contextlib.ExitStack() as stack:
            for device in dict.fromkeys(devices):
                if device in self.streams:
                    stack.enter_context(torch.cuda.stream(self.streams[device]))
            yield

    def finish(self, device: torch.device, outputs: Any) -> None:
        """The caller's stream waits for the pipeline; outputs stay allocated until it has used them."""
        if device not in self.streams:
            return
        current = torch.cuda.current_stream(device)
        current.wait_stream(self.streams[device])
        for out in outputs:
            _apply_tensors(out, lambda t: t.record_stream(current))


def _apply_tensors(data: Any, fn: Callable[[Tensor], Any]) -> None:
    apply_to_collection(data, Tensor, fn)


def _device_of(data: Any) -> torch.device | None:
    found: list[torch.device] = []
    _apply_tensors(data, lambda t: found.append(t.device))
    return found[0] if found else None


# ------------------------------------------------------------------------------------------ installing


class PipelineHandle:
    """Undo :func:`install_pipeline`: the owner gets its own ``forward`` back."""

    def __init__(self, owner: nn.Module, previous: Any) -> None:
        self.owner, self.previous = owner, previous

    def remove(self) -> None:
        self.owner.__dict__.pop("forward", None)
        if self.previous is not None:
            self.owner.__dict__["forward"] = self.previous


def stage_owner(root: nn.Module, stages: Sequence[str]) -> str:
    """The module a stage sequence replaces the forward of: the stages' common parent (or the one stage)."""
    return stages[0] if len(stages) == 1 else common_ancestor(stages)


def install_pipeline(
    root: nn.Module,
    plan: PlacementPlan,
    stages: Sequence[str],
    chunks: int,
    checkpoint: Checkpoint = None,
) -> PipelineHandle:
    """Check the stage sequence against the model and the plan, then pipeline the owner's forward."""
    paths = _stage_paths(root, stages)
    owner_path = stage_owner(root, paths)
    owner = root.get_submodule(owner_path)
    _check_sequence(root, owner_path, owner, paths)
    recomputed = _checkpointed(root, paths, checkpoint)
    previous = owner.__dict__.get("forward")
    callables: list[Callable[..., Any]] = [root.get_submodule(p) for p in paths]
    if paths == [owner_path]:
        callables = [owner.forward]  # micro-batching one module: its own forward is the stage
    partitions: list[Partition] = []
    for path, stage, position in zip(paths, callables, _positions(plan, paths), strict=True):
        if partitions and partitions[-1].position == position:
            last = partitions[-1]
            partitions[-1] = Partition(
                position, last.device, (*last.stages, stage), (*last.checkpointed, path in recomputed)
            )
        else:
            partitions.append(Partition(position, plan.devices[position], (stage,), (path in recomputed,)))
    norms = (m for p in paths for m in root.get_submodule(p).modules())
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in norms):
        warnings.warn(
            f"chunks={chunks} with BatchNorm in the pipelined stages: each micro-batch is normalised on its "
            "own statistics and running statistics update once per micro-batch, so training differs from "
            "the unsplit model. Prefer GroupNorm/LayerNorm, or chunks=1.",
            stacklevel=2,
        )
    check = None
    if not isinstance(owner, nn.Sequential) and paths != [owner_path]:
        original = previous or type(owner).forward.__get__(owner)
        stage_modules = [(p, root.get_submodule(p)) for p in paths]
        name = f"{owner_path or 'the LightningModule'} ({type(owner).__name__})"
        check = functools.partial(check_stage_chain, name, original, stage_modules)
    owner.__dict__["forward"] = Pipeline(partitions, chunks, plan.output_device, check)
    return PipelineHandle(owner, previous)


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
    name = f"{owner_path or 'the LightningModule'} ({type(owner).__name__})"
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
        expected = [join(owner_path, n) for n, _ in owner.named_children()]
        if paths != expected:
            raise PipelineError(
                f"{name} is an nn.Sequential: its stages are {expected}, in that order; got {paths}."
            )
        return
    if holds_tensors(owner, recurse=False):
        raise PipelineError(f"chunks > 1: {name} owns tensors: it is not only a chain of stages.")
    prefix = len(owner_path) + 1 if owner_path else 0
    missing = [join(owner_path, p) for p, _ in uncovered(owner, {p[prefix:] for p in paths})]
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


def _checkpointed(root: nn.Module, paths: list[str], checkpoint: Checkpoint) -> set[str]:
    if checkpoint is None or checkpoint is False or checkpoint in ("never", "none"):
        return set()
    if checkpoint is True or checkpoint in ("all", "always"):
        return set(paths)
    if isinstance(checkpoint, str):
        checkpoint = [checkpoint]
    chosen = set(_stage_paths(root, list(checkpoint)))
    unknown = sorted(chosen - set(paths))
    if unknown:
        raise PipelineError(f"checkpoint names {unknown}, which are not stages; the stages are {paths}.")
    return chosen
