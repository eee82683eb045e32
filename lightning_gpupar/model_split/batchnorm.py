"""Deferred BatchNorm: running statistics updated once per step from all of a pipeline's micro-batches.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/batchnorm.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


def batch_norms(modules: Iterable[nn.Module]) -> list[_BatchNorm]:
    """The BatchNorm layers (``SyncBatchNorm`` included) in ``modules``' trees, once each."""
    found: dict[int, _BatchNorm] = {}
    for module in modules:
        for layer in module.modules():
            if isinstance(layer, _BatchNorm):
                found.setdefault(id(layer), layer)
    return list(found.values())


@dataclass
class _Moments:
    """Per-channel statistics of the samples seen so far: their count, mean and sum of squared deviations.

    The count stays a Python number on the host (a tensor only once gathered from other processes): making
    it a CUDA tensor from a number would copy from the host and wait for the GPU, per layer and micro-batch.
    """

    count: Tensor | float
    mean: Tensor
    m2: Tensor

    @classmethod
    def of(cls, x: Tensor) -> _Moments:
        if x.dtype in (torch.float16, torch.bfloat16):
            x = x.float()
        dims = [d for d in range(x.dim()) if d != 1]
        count = float(x.numel() // x.shape[1])  # shapes are known on the host: no GPU round trip
        mean = x.mean(dims)
        shape = [1, -1] + [1] * (x.dim() - 2)
        return cls(count, mean, ((x - mean.view(shape)) ** 2).sum(dims))

    def add(self, other: _Moments) -> _Moments:
        """Chan et al.'s combination of two disjoint sets of samples."""
        like = self.mean
        other = _Moments(_to(other.count, like), other.mean.to(like), other.m2.to(like))
        count = self.count + other.count
        delta = other.mean - self.mean
        mean = self.mean + delta * other.count / count
        m2 = self.m2 + other.m2 + delta**2 * self.count * other.count / count
        return _Moments(count, mean, m2)


class DeferredBatchNorms:
    """Defer the running-statistics updates of ``layers`` to the end of each :meth:`step` (module doc)."""

    def __init__(self, layers: Iterable[_BatchNorm]) -> None:
        self.layers = [layer for layer in layers if layer.track_running_stats]
        self.collecting = False
        self._moments: dict[int, _Moments] = {}
        for layer in self.layers:
            layer.__dict__["forward"] = self._forward_of(layer)

    def remove(self) -> None:
        """Give every layer its own forward back."""
        for layer in self.layers:
            layer.__dict__.pop("forward", None)
        self.layers = []

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        """Collect the statistics of the micro-batches run inside the block; commit them once at its end.

        The commit runs on the caller's current stream and reads statistics computed on the pipeline's
        compute streams: the block must end with the caller's streams waiting for those
        (``DeviceStreams.end``), or the commit may read half-written statistics."""
        self.collecting, self._moments = True, {}
        try:
            yield
        finally:
            self.collecting = False
        moments, self._moments = self._moments, {}
        with torch.no_grad():
            for layer in self.layers:
                if id(layer) in moments:
                    _commit(layer, _across_processes(layer, moments[id(layer)]))

    def _forward_of(self, layer: _BatchNorm) -> nn.Module:
        plain = type(layer).forward

        def forward(input: Tensor) -> Tensor:
            if not layer.training:
                return plain(layer, input)
            layer.track_running_stats = False  # batch statistics, nothing updated (torch's own forward)
            try:
                output = plain(layer, input)
            finally:
                layer.track_running_stats = True
            if self.collecting:
                with torch.no_grad():
                    seen = _Moments.of(input.detach())
                    earlier = self._moments.get(id(layer))
                    self._moments[id(layer)] = seen if earlier is None else earlier.add(seen)
            return output

        return forward  # type: ignore[return-value]


def _across_processes(layer: _BatchNorm, moments: _Moments) -> _Moments:
    """A ``SyncBatchNorm``'s statistics combined over its process group (the others' unchanged)."""
    if not (isinstance(layer, nn.SyncBatchNorm) and dist.is_available() and dist.is_initialized()):
        return moments
    group = layer.process_group or dist.group.WORLD
    size = dist.get_world_size(group)
    if size == 1:
        return moments
    count = moments.count
    count = count.view(1) if isinstance(count, Tensor) else moments.mean.new_full((1,), count)
    local = torch.cat([count.to(moments.mean.dtype), moments.mean, moments.m2])
    gathered = [torch.empty_like(local) for _ in range(size)]
    dist.all_gather(gathered, local, group=group)
    channels = moments.mean.numel()
    total: _Moments | None = None
    for row in gathered:
        part = _Moments(row[0], row[1 : 1 + channels], row[1 + channels :])
        total = part if total is None else total.add(part)
    assert total is not None
    return total


def _commit(layer: _BatchNorm, moments: _Moments) -> None:
    """One running-statistics update from ``moments``, exactly as the layer's forward on the whole batch."""
    assert layer.running_mean is not None and layer.running_var is not None
    assert layer.num_batches_tracked is not None
    for tensor in (moments.count, moments.mean, moments.m2):  # made on the pipeline's streams, read here
        if isinstance(tensor, Tensor) and tensor.is_cuda:
            tensor.record_stream(torch.cuda.current_stream(tensor.device))
    layer.num_batches_tracked.add_(1)
    # torch's own update divides by n - 1 as well
    count = moments.count.clamp(min=2) if isinstance(moments.count, Tensor) else max(moments.count, 2.0)
    unbiased = (moments.m2 / (count - 1)).to(layer.running_var.dtype)
    mean = moments.mean.to(layer.running_mean.dtype)
    if layer.momentum is None:  # a cumulative moving average, on the device (float() would wait for it)
        factor = layer.num_batches_tracked.to(layer.running_mean.dtype).reciprocal()
        layer.running_mean.add_((mean - layer.running_mean) * factor)
        layer.running_var.add_((unbiased - layer.running_var) * factor)
        return
    layer.running_mean.mul_(1 - layer.momentum).add_(mean, alpha=layer.momentum)
    layer.running_var.mul_(1 - layer.momentum).add_(unbiased, alpha=layer.momentum)


def _to(value: Tensor | float, like: Tensor) -> Tensor | float:
    """``value`` on ``like``'s device and dtype; a Python number stays one."""
    return value.to(like.device, like.dtype) if isinstance(value, Tensor) else value
