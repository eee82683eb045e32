"""Our strategies from Lightning's own command line, ``LightningCLI`` (jsonargparse): by registered name
(``--trainer.strategy=dp``) and by class path with init arguments
(``--trainer.strategy=lightning_gpupar.ModelSplitStrategy --trainer.strategy.placement=...``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LightningCLI
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gpupar  # noqa: F401  (registers "dp" before the CLI builds the Trainer)
from lightning_gpupar import DataParallelStrategy, ModelSplitStrategy


class CliNet(pl.LightningModule):
    """An MLP whose hyperparameters the CLI exposes as ``--model.*``."""

    def __init__(self, hidden: int = 16, lr: float = 0.1) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(6, hidden), nn.Tanh(), nn.Linear(hidden, 3))
        self.lr = lr
        self.initial = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.losses: list[float] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))  # on the root, once per step (under dp too)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class CliData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 7) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(28, 6, generator=g), torch.randint(0, 3, (28,), generator=g))
        return DataLoader(data, batch_size=self.batch_size)


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """``args=`` stands for the whole command line: pytest's own arguments are not the CLI's."""
    monkeypatch.setattr(sys, "argv", ["main.py"])


def train(tmp_path: Path, *strategy_args: str) -> LightningCLI:
    args = [
        "fit",
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        *strategy_args,
        "--trainer.max_steps=3",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        "--model.hidden=8",
    ]
    return LightningCLI(CliNet, CliData, args=args, save_config_kwargs={"overwrite": True})


def assert_trained(cli: LightningCLI) -> None:
    module = cli.model
    assert isinstance(module, CliNet)
    assert cli.trainer.global_step == 3 and len(module.losses) == 3
    assert all(torch.isfinite(torch.tensor(module.losses)))
    changed = [k for k, v in module.model.state_dict().items() if not torch.equal(v.cpu(), module.initial[k])]
    assert len(changed) == 4  # every weight and bias took SGD steps


def test_lightning_cli_trains_with_strategy_dp(tmp_path: Path) -> None:
    cli = train(tmp_path, "--trainer.strategy=dp")
    assert isinstance(cli.trainer.strategy, DataParallelStrategy)
    assert cli.trainer.strategy.devices == [torch.device("cpu")] * 2
    assert_trained(cli)


@pytest.mark.parametrize("chunks", [1, 2])
def test_lightning_cli_trains_with_model_split_and_a_placement(tmp_path: Path, chunks: int) -> None:
    cli = train(
        tmp_path,
        "--trainer.strategy=lightning_gpupar.ModelSplitStrategy",
        "--trainer.strategy.placement={model.0: 0, model.1-2: 1}",
        f"--trainer.strategy.chunks={chunks}",
    )
    strategy = cli.trainer.strategy
    assert isinstance(strategy, ModelSplitStrategy)
    assert strategy.placement == {"model.0": 0, "model.1-2": 1} and strategy.chunks == chunks
    assert_trained(cli)
