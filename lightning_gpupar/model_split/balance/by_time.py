"""Balance by time: split the stage chain so that the slowest device is as fast as possible.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/balance/by_time.py``.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields, replace
from typing import Any, Protocol

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn

from lightning_gpupar.devices.sizes import format_bytes
from lightning_gpupar.model_split.chain_check import _buffers_kept
from lightning_gpupar.model_split.errors import PlacementError
from lightning_gpupar.model_split.paths import module_bytes
from lightning_gpupar.model_split.pipeline import _stage_paths
from lightning_gpupar.model_split.plan import PlacementPlan, _caps, plan_placement


class RunPrecision(Protocol):
    """What timing needs of the run's precision: Lightning's precision plugins provide both."""

    def convert_input(self, data: Any) -> Any: ...

    def forward_context(self) -> AbstractContextManager[Any]: ...


@dataclass(frozen=True)
class TimedPlan(PlacementPlan):
    """A plan balanced by time; its table adds each device's measured stage time and the bubble."""

    stage_times: tuple[tuple[str, int, float], ...] = ()  #: (stage path, position, seconds fwd + bwd)
    chunks: int = 1

    def position_times(self) -> list[float]:
        """Measured forward + backward seconds of the stages on each position."""
        totals = [0.0] * len(self.devices)
        for _, position, seconds in self.stage_times:
            totals[position] += seconds
        return totals

    def table(self, free_bytes: Callable[[torch.device], int | None] | None = None) -> str:
        used = sorted({position for _, position, _ in self.stage_times})
        k, m = len(used), self.chunks
        lines = [super().table(free_bytes), "", "balance=time: measured forward + backward per stage group"]
        for position in used:
            stages = [path for path, p, _ in self.stage_times if p == position]
            seconds = self.position_times()[position]
            lines.append(
                f"  position {position} ({self.devices[position]}): {seconds * 1e3:.2f} ms  {stages}"
            )
        lines.append(f"expected bubble (K-1)/(M+K-1) with K={k}, M={m}: {(k - 1) / (m + k - 1):.1%}")
        return "\n".join(lines)


def sample_input(module: nn.Module) -> Any:
    """The LightningModule's ``example_input_array``, or a clear error."""
    sample = getattr(module, "example_input_array", None)
    if sample is None:
        raise PlacementError(
            f"balance='time' times each stage on a sample batch, but {type(module).__name__} has no "
            "example_input_array. Set self.example_input_array in its __init__ (an input of its forward, "
            "batch size as in training), or use balance='memory'."
        )
    return sample


def measure_stage_times(
    root: nn.Module,
    stages: Sequence[str],
    sample: Any,
    device: torch.device,
    warmup: int = 1,
    repeats: int = 3,
    precision: RunPrecision | None = None,
) -> list[float]:
    """Median forward + backward seconds of each stage of ``root`` on the input it gets from ``sample``.

    Everything runs in training mode; each stage moves to ``device`` for its measurement and back
    afterwards; gradients, buffers, training flags and the RNG state are as before. ``precision``: the
    run's, which converts the sample and wraps every forward (the module must already be converted, as
    Lightning converts it before placement).
    """
    modules = [root.get_submodule(path) for path in stages]
    with _training_mode(root):
        return _measure(root, modules, sample, device, warmup, repeats, precision)


def _measure(
    root: nn.Module,
    modules: Sequence[nn.Module],
    sample: Any,
    device: torch.device,
    warmup: int,
    repeats: int,
    precision: RunPrecision | None,
) -> list[float]:
    inputs = _stage_inputs(root, modules, sample, precision)
    in_precision = precision.forward_context if precision is not None else contextlib.nullcontext
    times = []
    with torch.random.fork_rng(devices=_cuda_indices(root, sample, device)), _buffers_kept(modules):
        for module, (args, kwargs) in zip(modules, inputs, strict=True):
            home = next((t.device for t in [*module.parameters(), *module.buffers()]), device)
            grads = {p: None if p.grad is None else p.grad.clone() for p in module.parameters()}
            module.to(device)
            args, kwargs = move_data_to_device((args, kwargs), device)
            samples = []
            for run in range(warmup + repeats):
                args, kwargs = _fresh_leaves((args, kwargs))
                _synchronize(device)
                start = time.perf_counter()
                with in_precision():
                    outputs = [t for t in _tensors(module(*args, **kwargs)) if t.requires_grad]
                if outputs:
                    torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs])
                _synchronize(device)
                if run >= warmup:
                    samples.append(time.perf_counter() - start)
            module.to(home)
            for param, grad in grads.items():
                param.grad = grad
            times.append(statistics.median(samples))
    return times


def partition_chain(costs: Sequence[float], sizes: Sequence[int], caps: Sequence[float]) -> list[int]:
    """The group (0..K-1) of each unit of a chain: contiguous groups, the largest group cost as small as
    possible, group ``g``'s size within ``caps[g]``. Groups may be empty. Raises if nothing fits."""
    n, k = len(costs), len(caps)
    cost = [0.0]
    size = [0]
    for c, s in zip(costs, sizes, strict=True):
        cost.append(cost[-1] + c)
        size.append(size[-1] + s)
    inf = float("inf")
    # best[g][i]: the smallest largest-group cost of the first i units in groups 0..g; cut[g][i]: where
    # group g starts in that solution.
    best = [[inf] * (n + 1) for _ in range(k)]
    cut = [[0] * (n + 1) for _ in range(k)]
    for i in range(n + 1):
        if size[i] <= caps[0]:
            best[0][i] = cost[i]
    for g in range(1, k):
        for i in range(n + 1):
            for j in range(i + 1):
                if size[i] - size[j] > caps[g] or best[g - 1][j] == inf:
                    continue
                value = max(best[g - 1][j], cost[i] - cost[j])
                if value < best[g][i]:
                    best[g][i], cut[g][i] = value, j
    if best[k - 1][n] == inf:
        raise PlacementError(
            f"balance='time' cannot fit the chain ({format_bytes(size[n])}) under the max_memory caps "
            f"{[format_bytes(int(c)) if c != inf else 'none' for c in caps]}: raise max_memory or add "
            "devices."
        )
    groups = [0] * n
    i = n
    for g in range(k - 1, 0, -1):
        j = cut[g][i]
        groups[j:i] = [g] * (i - j)
        i = j
    return groups


def plan_by_time(
    root: nn.Module,
    devices: Sequence[torch.device],
    stages: Sequence[str],
    *,
    chunks: int = 1,
    output_device: int | None = None,
    max_memory: Mapping[Any, int | str] | None = None,
    precision: RunPrecision | None = None,
) -> TimedPlan:
    """Place ``stages`` (the chain, in order) over ``devices`` by measured time; see the module doc."""
    paths = _stage_paths(root, stages)
    times = measure_stage_times(root, paths, sample_input(root), devices[0], precision=precision)
    sizes = [module_bytes(root.get_submodule(p))[1] for p in paths]
    groups = partition_chain(times, sizes, _caps(max_memory, devices))
    placement = dict(zip(paths, groups, strict=True))
    plan = plan_placement(root, devices, placement, default_device=max(groups), output_device=output_device)
    entries = tuple(replace(e, source="time") if e.source == "map" else e for e in plan.entries)
    timed = tuple(zip(paths, groups, times, strict=True))
    base = {f.name: getattr(plan, f.name) for f in fields(plan)}
    return TimedPlan(**{**base, "entries": entries}, stage_times=timed, chunks=chunks)


def _stage_inputs(
    root: nn.Module, modules: Sequence[nn.Module], sample: Any, precision: RunPrecision | None = None
) -> list[tuple[Any, Any]]:
    """Each stage's (args, kwargs) when ``root`` runs ``sample`` (in ``precision``), recorded on its first
    call."""
    seen: dict[int, tuple[Any, Any]] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda m, a, kw: seen.setdefault(id(m), (a, kw)) and None, with_kwargs=True, prepend=True
        )
        for m in modules
    ]
    gpus = _cuda_indices(root, sample)
    context = precision.forward_context() if precision is not None else contextlib.nullcontext()
    sample = precision.convert_input(sample) if precision is not None else sample
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=gpus), _buffers_kept([root]), context:
            if isinstance(sample, tuple):
                root(*sample)
            elif isinstance(sample, dict):
                root(**sample)
            else:
                root(sample)
    finally:
        for handle in handles:
            handle.remove()
    missing = [i for i, m in enumerate(modules) if id(m) not in seen]
    if missing:
        raise PlacementError(
            f"balance='time': the forward on example_input_array never called stage(s) {missing}; "
            "declare the stages the forward runs (strategy.stages=[...]) or use balance='memory'."
        )
    return [seen[id(m)] for m in modules]


def _cuda_indices(root: nn.Module, sample: Any, *devices: torch.device) -> list[int]:
    """The GPUs whose RNG a measurement may draw from: those of the model's tensors, the sample and
    ``devices``. Forking every GPU's RNG would create a CUDA context on GPUs the plan never uses."""
    found = [*root.parameters(), *root.buffers(), *_tensors(sample)]
    cuda = {t.device for t in found if t.is_cuda} | {d for d in devices if d.type == "cuda"}
    return sorted({d.index if d.index is not None else torch.cuda.current_device() for d in cuda})


@contextlib.contextmanager
def _training_mode(root: nn.Module) -> Iterator[None]:
    """``root`` in training mode inside the block (stages are timed as training runs them), its modules'
    own flags back afterwards."""
    flags = [(module, module.training) for module in root.modules()]
    root.train()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def _fresh_leaves(data: Any) -> Any:
    """Detached copies of the floating tensors as leaves requiring grad: backward computes input grads."""
    return apply_to_collection(
        data, Tensor, lambda t: t.detach().requires_grad_(t.is_floating_point() or t.is_complex())
    )


def _tensors(data: Any) -> list[Tensor]:
    found: list[Tensor] = []
    apply_to_collection(data, Tensor, found.append)
    return found


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
