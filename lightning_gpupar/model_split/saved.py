"""What a pipeline's partitions keep for backward, measured: per partition, the peak number of micro-batches
whose activations are alive and the peak bytes of tensors autograd saved for backward.

:class:`SavedActivations` hooks the partitions' stages (forward pre-hooks say which partition and which call
is running) and autograd's saved tensors (:func:`torch.autograd.graph.saved_tensors_hooks`): a saved tensor
is alive until autograd frees it after its backward. Parameters (and views of them) are not counted;
stages that recompute (``checkpoint=``) save only their inputs, inside torch's own hooks, and count nothing.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gpupar.model_split.pipeline import Pipeline


class _Saved:
    """A saved tensor, tagged with its partition and call; its death (autograd freed it) is counted."""

    __slots__ = ("__weakref__", "tensor")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor


class SavedActivations:
    """Inside ``with SavedActivations(pipeline) as saved:``, record :attr:`peak_microbatches` and
    :attr:`peak_bytes` per partition index (module doc)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.peak_microbatches: dict[int, int] = {}
        self.peak_bytes: dict[int, int] = {}
        self._alive_calls: dict[int, Counter[int]] = {}
        self._alive_bytes: dict[int, int] = {}
        self._active: int | None = None  #: the partition whose stage is running
        self._call: dict[int, int] = {}  #: each partition's current call (one micro-batch)
        self._calls = 0
        self._params: set[int] = set()
        self._stack = contextlib.ExitStack()

    def __enter__(self) -> SavedActivations:
        for j, partition in enumerate(self.pipeline.partitions):
            for k, stage in enumerate(partition.stages):
                module = stage if isinstance(stage, nn.Module) else getattr(stage, "__self__", None)
                if not isinstance(module, nn.Module):
                    continue
                self._params |= {p.untyped_storage().data_ptr() for p in module.parameters()}
                pre = module.register_forward_pre_hook(self._enter_hook(j, first=k == 0))
                post = module.register_forward_hook(self._leave_hook)
                self._stack.callback(pre.remove)
                self._stack.callback(post.remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack))
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stack.close()

    def _enter_hook(self, partition: int, first: bool) -> Any:
        def hook(*_: Any) -> None:
            if first or partition not in self._call:
                self._calls += 1
                self._call[partition] = self._calls
            self._active = partition

        return hook

    def _leave_hook(self, *_: Any) -> None:
        self._active = None

    def _pack(self, tensor: Tensor) -> Any:
        partition = self._active
        if partition is None or tensor.untyped_storage().data_ptr() in self._params:
            return tensor
        saved = _Saved(tensor)
        call = self._call[partition]
        size = tensor.numel() * tensor.element_size()
        calls = self._alive_calls.setdefault(partition, Counter())
        calls[call] += 1
        self._alive_bytes[partition] = self._alive_bytes.get(partition, 0) + size
        self.peak_microbatches[partition] = max(self.peak_microbatches.get(partition, 0), len(calls))
        self.peak_bytes[partition] = max(self.peak_bytes.get(partition, 0), self._alive_bytes[partition])
        weakref.finalize(saved, self._freed, partition, call, size)
        return saved

    @staticmethod
    def _unpack(saved: Any) -> Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def _freed(self, partition: int, call: int, size: int) -> None:
        calls = self._alive_calls[partition]
        calls[call] -= 1
        if calls[call] <= 0:
            del calls[call]
        self._alive_bytes[partition] -= size
