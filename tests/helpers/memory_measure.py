"""Measure what one real CPU training step holds: parameters, buffers, gradients, optimizer state and the
activations autograd saves, by counting the bytes of distinct tensor storages."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class Measured:
    params: int
    buffers: int
    grads: int
    optimizer: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.buffers + self.grads + self.optimizer + self.activations


def _storage_bytes(tensors: list[Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def measure_training_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, forward: Callable[[], Tensor]
) -> Measured:
    """Run ``forward()`` (returning a scalar loss), backward and one optimizer step; count what it holds."""
    model.train()
    params = list(model.parameters())
    buffers = [b for b in model.buffers() if b is not None]
    held = {t.untyped_storage().data_ptr() for t in [*params, *buffers]}
    saved: list[Tensor] = []

    def pack(t: Tensor) -> Tensor:
        if t.untyped_storage().data_ptr() not in held:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward()
    activations = _storage_bytes(saved)
    loss.backward()
    optimizer.step()
    state = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, Tensor) and v.dim()]
    grads = [p.grad for p in params if p.grad is not None]
    return Measured(
        _storage_bytes(params),
        _storage_bytes(buffers),
        _storage_bytes(grads),
        _storage_bytes(state),
        activations,
    )


def forward_loss(model: nn.Module, inputs: Any) -> Callable[[], Tensor]:
    """A loss that sums every floating-point output (for a transformers model: every field it returns), so
    that every parameter gets a gradient and optimizer state."""

    def run() -> Tensor:
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
        values = out.to_tuple() if hasattr(out, "to_tuple") else (out,)
        floats = [v for v in values if isinstance(v, Tensor) and v.is_floating_point()]
        return torch.stack([v.float().sum() for v in floats]).sum()

    return run
