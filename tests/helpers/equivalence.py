"""A float64 reference workload for equivalence tests: every strategy must match single-device training.

``run(...)`` trains a small MLP with plain SGD on a fixed global batch sequence and returns what one
needs to compare: the loss and gradients of every step, the final weights, and logged metrics.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gpupar  # noqa: F401  (registers our strategy names)
from tests.helpers.trainer import TRAINING_ONLY


def make_data(n: int = 64, features: int = 6, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    """MLP whose steps record what equivalence tests compare."""

    def __init__(self, features: int = 6, classes: int = 3, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(1234)
        self.model = nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Linear(16, classes)).double()
        self.lr = lr
        self.losses: list[float] = []
        self.grads: list[dict[str, Tensor]] = []

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.cross_entropy(self(x), y))

    def predict_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self(batch[0])

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads.append({k: p.grad.detach().cpu().clone() for k, p in self.named_parameters()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class ProbeNet(TinyNet):
    """Records, from inside each replica, its thread, device and thread-local autocast state."""

    def __init__(self, device_type: str = "cpu") -> None:
        super().__init__()
        self.device_type = device_type
        self.seen: list[tuple[str, torch.device, bool, torch.dtype | None]] = []
        self.lock = threading.Lock()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        autocast = torch.is_autocast_enabled(self.device_type)
        dtype = torch.get_autocast_dtype(self.device_type) if autocast else None
        with self.lock:
            self.seen.append((threading.current_thread().name, self.device, autocast, dtype))
        return super().training_step(batch, batch_idx)


@dataclass
class Result:
    losses: list[float]
    grads: list[dict[str, Tensor]]
    weights: dict[str, Tensor]
    metrics: dict[str, float] = field(default_factory=dict)
    predictions: Tensor | None = None


def run(
    module: pl.LightningModule | None = None,
    batch_size: int = 8,
    n: int = 64,
    max_steps: int = 3,
    predict: bool = False,
    **trainer_kwargs: Any,
) -> Result:
    """Fit ``module`` (default TinyNet) on the CPU with ``trainer_kwargs`` (strategy, devices, ...)."""
    module = module or TinyNet()
    data = make_data(n)
    kwargs: dict[str, Any] = {**TRAINING_ONLY, "accelerator": "cpu", "max_steps": max_steps}
    kwargs.update(trainer_kwargs)
    trainer = pl.Trainer(**kwargs)
    trainer.fit(module, DataLoader(data, batch_size=batch_size), DataLoader(data, batch_size=batch_size))
    result = Result(
        losses=list(getattr(module, "losses", [])),
        grads=list(getattr(module, "grads", [])),
        weights={k: v.detach().cpu().clone() for k, v in module.state_dict().items()},
        metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
    )
    if predict:
        out = trainer.predict(module, DataLoader(data, batch_size=batch_size))
        assert out is not None
        result.predictions = torch.cat(out)  # type: ignore[arg-type]
    return result


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = 1e-10, atol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=f"{key} differs")
