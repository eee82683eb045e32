"""A model trained through ModelSplitStrategy as a new user would: wrapped in a LightningModule, one step
on CPU devices, with the step's loss and gradients recorded to compare with the unsplit model."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.trainer import TRAINING_ONLY


class Wrapped(pl.LightningModule):
    """``self.model`` trained on the mean square of its output; records the loss and gradients of a step."""

    def __init__(self, model: nn.Module, example: Any = None) -> None:
        super().__init__()
        self.model = model
        self.example_input_array = example
        self.loss: Tensor | None = None
        self.grads: dict[str, Tensor] = {}

    def forward(self, x: Any) -> Any:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return square_mean(self(batch[0]))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.loss = outputs["loss"].detach().cpu()

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads = {
            k: p.grad.detach().cpu().clone() for k, p in self.named_parameters() if p.grad is not None
        }

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)  # no update: states stay comparable


def square_mean(output: Any) -> Tensor:
    """The loss: the mean square of the output's tensors, summed."""
    tensors = [output] if isinstance(output, Tensor) else [t for t in output if isinstance(t, Tensor)]
    return sum(t.pow(2).mean() for t in tensors)  # type: ignore[return-value]


def fit(
    model: nn.Module | pl.LightningModule,
    strategy: Any,
    devices: int = 2,
    x: Tensor | None = None,
    example: Any = None,
    steps: int = 1,
    **trainer_options: Any,
) -> Any:
    """``steps`` training steps on ``x`` (default: 4 samples of 4 float64 features), one batch each."""
    x = torch.randn(4, 4, dtype=torch.float64) if x is None else x
    module = model if isinstance(model, pl.LightningModule) else Wrapped(model, example)
    options = {**TRAINING_ONLY, "max_steps": steps, **trainer_options}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy=strategy, **options)
    trainer.fit(module, DataLoader(TensorDataset(x), batch_size=len(x)))
    return module


def reference(model: nn.Module, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The unsplit model's loss and gradients on ``x`` (on a copy: ``model`` is left untouched)."""
    model = copy.deepcopy(model)
    loss = square_mean(model(x))
    loss.backward()
    return loss.detach(), {f"model.{k}": p.grad for k, p in model.named_parameters() if p.grad is not None}


def assert_same_step(split: Wrapped, loss: Tensor, grads: dict[str, Tensor]) -> None:
    """The split step's loss and gradients equal the unsplit model's (float64 tolerances)."""
    assert split.loss is not None
    torch.testing.assert_close(split.loss, loss, rtol=1e-10, atol=1e-12)
    assert split.grads.keys() == grads.keys()
    for key, grad in grads.items():
        torch.testing.assert_close(split.grads[key], grad, rtol=1e-10, atol=1e-12, msg=key)
