"""LightningModules the dp tests share (CPU and CUDA): logging with metrics, manual optimization."""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from tests.helpers.equivalence import TinyNet


class LoggingNet(TinyNet):
    """Logs with every reduce_fx and updates torchmetrics Accuracy in the steps."""

    def __init__(self) -> None:
        super().__init__()
        self.train_acc = MulticlassAccuracy(3, average="micro")
        self.val_acc = MulticlassAccuracy(3, average="micro")
        self.threads: set[str] = set()
        self.update_counts: list[int] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        self.threads.add(threading.current_thread().name)
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("acc_step", self.train_acc, on_step=True, on_epoch=False)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        self.log("loss_mean", loss, on_step=False, on_epoch=True)
        self.log("count", float(len(x)), reduce_fx="sum", on_step=True, on_epoch=False)
        self.log("largest", x.abs().max(), reduce_fx="max", on_step=True, on_epoch=False)
        self.log("smallest", x.abs().min(), reduce_fx=torch.min, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.update_counts.append(self.train_acc.update_count)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc.update(logits, y)
        self.log("val_acc", self.val_acc)
        self.log("val_loss", F.cross_entropy(logits, y))


class ManualNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.forward_sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.forward_sizes.append(len(x))
        return self.model(x)

    def logits(self, x: Tensor) -> Tensor:
        """The step's forward: data-parallel through ``self(x)``."""
        return self(x)

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        optimizer = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self.logits(x), y)
        optimizer.zero_grad()  # type: ignore[union-attr]
        self.manual_backward(loss)
        self.grads.append({k: p.grad.detach().cpu().clone() for k, p in self.named_parameters()})  # type: ignore[union-attr]
        optimizer.step()  # type: ignore[union-attr]
        self.losses.append(float(loss))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        pass


class BatchNormNet(TinyNet):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
        self.steps_on_self = 0

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        self.steps_on_self += 1  # lost with the replica, as documented
        return super().training_step(batch, batch_idx)
