"""Example LightningModules. Each holds its network as ``self.model``, a plain ``nn.Module``.

The Transformer's network has the submodules ``embed``, ``blocks`` (an ``nn.ModuleList``) and ``head``,
so placement maps can name ``model.embed``, ``model.blocks.0-1`` and ``model.head``.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

Batch = tuple[Tensor, Tensor]


class ClassifierModule(pl.LightningModule):
    """Cross-entropy classification with accuracy metrics; subclasses build ``self.model``."""

    def __init__(self, num_classes: int, lr: float) -> None:
        super().__init__()
        self.lr = lr
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.model: nn.Module

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        self.train_acc.update(logits, y)  # logged per epoch only: no per-batch value to compute
        self.log("train_loss", loss, prog_bar=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc(logits, y)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", self.test_acc)

    def predict_step(self, batch: Batch, batch_idx: int) -> Tensor:
        return self(batch[0]).argmax(dim=-1)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


class MLPClassifier(ClassifierModule):
    """A multi-layer perceptron on flat feature vectors (digits: 64 features, 10 classes)."""

    def __init__(
        self,
        in_features: int = 64,
        hidden: tuple[int, ...] = (128, 128),
        num_classes: int = 10,
        lr: float = 3e-3,
    ) -> None:
        super().__init__(num_classes, lr)
        self.save_hyperparameters()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.model = nn.Sequential(*layers)


class CNNClassifier(ClassifierModule):
    """A small convolutional network with BatchNorm on 1x8x8 images."""

    def __init__(self, channels: int = 32, num_classes: int = 10, lr: float = 3e-3) -> None:
        super().__init__(num_classes, lr)
        self.save_hyperparameters()
        self.model = nn.Sequential(
            nn.Conv2d(1, channels, 3, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(channels * 16, num_classes),
        )


class TokenEmbedding(nn.Module):
    """Token plus learned position embeddings."""

    def __init__(self, vocab_size: int, d_model: int, max_len: int) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.positions = nn.Parameter(torch.zeros(max_len, d_model))

    def forward(self, tokens: Tensor) -> Tensor:
        return self.tokens(tokens) + self.positions[: tokens.shape[1]]


class PoolHead(nn.Module):
    """Mean over the sequence, layer norm, linear classifier."""

    def __init__(self, d_model: int, num_classes: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model)
        self.linear = nn.Linear(d_model, num_classes)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(self.norm(hidden.mean(dim=1)))


class TransformerNet(nn.Module):
    """``embed`` -> ``blocks[0..n)`` -> ``head``: each stage takes and returns one tensor."""

    def __init__(
        self, vocab_size: int, d_model: int, nhead: int, num_layers: int, num_classes: int, max_len: int
    ) -> None:
        super().__init__()
        self.embed = TokenEmbedding(vocab_size, d_model, max_len)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.0, batch_first=True)
            for _ in range(num_layers)
        )
        self.head = PoolHead(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        hidden = self.embed(tokens)
        for block in self.blocks:
            hidden = block(hidden)
        return self.head(hidden)


class TransformerClassifier(ClassifierModule):
    """A small Transformer encoder classifying token sequences."""

    def __init__(
        self,
        vocab_size: int = 16,
        d_model: int = 64,
        nhead: int = 4,
        num_layers: int = 4,
        num_classes: int = 2,
        max_len: int = 64,
        lr: float = 1e-3,
    ) -> None:
        super().__init__(num_classes, lr)
        self.save_hyperparameters()
        self.model = TransformerNet(vocab_size, d_model, nhead, num_layers, num_classes, max_len)
