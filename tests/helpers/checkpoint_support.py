"""Tiny networks, LightningModules and artifacts shared by the checkpoint tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from tests.helpers.trainer import QUIET

ROOT = Path(__file__).resolve().parents[2]


def make_net(batchnorm: bool = True) -> nn.Module:
    """A network with a buffer-holding layer (unless ``batchnorm=False``: per-replica statistics differ)."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
    return nn.Sequential(nn.Linear(4, 8), norm, nn.Tanh(), nn.Linear(8, 2)).double()


class ModuleNextToAParameter(nn.Module):
    """An attribute called ``module`` whose only sibling is a parameter (a tensor, not a submodule)."""

    def __init__(self) -> None:
        super().__init__()
        self.module = nn.Linear(4, 2).double()
        self.bias = nn.Parameter(torch.ones(2, dtype=torch.float64))  # ``module.bias`` -> ``bias`` collides

    def forward(self, x: Tensor) -> Tensor:
        return self.module(x) + self.bias  # type: ignore[no-any-return]


class TinyModule(pl.LightningModule):
    """Holds its network as ``self.model``; ``wrap="dp"`` holds it inside ``nn.DataParallel`` instead.

    ``wrap="attribute"`` holds a :class:`ModuleNextToAParameter` (no wrapper, a ``module`` attribute).
    """

    def __init__(self, wrap: str | None = None, lr: float = 0.05, batchnorm: bool = True) -> None:
        super().__init__()
        self.save_hyperparameters()
        net = make_net(batchnorm)
        self.model: nn.Module = nn.DataParallel(net) if wrap == "dp" else net
        if wrap == "attribute":
            self.model = ModuleNextToAParameter()

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)  # type: ignore[no-any-return]

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])


class ChainNet(nn.Module):
    """The TransformerNet's layout (``embed``, ``blocks`` as an ``nn.ModuleList``, ``head``), each block
    held inside ``nn.DataParallel`` (on the CPU it just calls the block) so its keys carry ``module.``.
    """

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 8)
        self.blocks = nn.ModuleList(
            nn.DataParallel(nn.Sequential(nn.Linear(8, 8), nn.Tanh())) for _ in range(4)
        )
        self.head = nn.Linear(8, 2)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        x = self.embed(x)
        for block in self.blocks:
            x = block(x)
        return self.head(x)  # type: ignore[no-any-return]


class ChainModule(TinyModule):
    """A LightningModule holding a :class:`ChainNet` as ``self.model`` (``wrap="dp"``: in DataParallel)."""

    def __init__(self, wrap: str | None = None, lr: float = 0.05) -> None:
        super().__init__(lr=lr)
        self.model = nn.DataParallel(ChainNet()) if wrap == "dp" else ChainNet()


def app_trainer_kwargs(*overrides: str) -> dict[str, Any]:
    """The strategy, accelerator and devices the Hydra app builds for ``overrides`` (as build_trainer)."""
    from hydra import compose, initialize_config_dir

    from examples.schema import register_app_configs
    from lightning_gpupar.config import build_strategy, select_devices

    register_app_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    selection = select_devices(cfg.strategy, cfg.trainer.accelerator)
    return {
        "strategy": build_strategy(cfg.strategy),
        "accelerator": selection.accelerator,
        "devices": selection.trainer_devices,
    }


@contextmanager
def saving_as_cuda3() -> Iterator[None]:
    """Make torch.save record CPU storages as living on ``cuda:3``: the bytes a CUDA machine writes.

    The location is a string in the file's pickle; this tagger, tried before torch's own, writes it.
    """
    entry = (0, lambda storage: "cuda:3" if storage.device.type == "cpu" else None, lambda s, loc: None)
    torch.serialization._package_registry.insert(0, entry)  # type: ignore[arg-type]
    try:
        yield
    finally:
        torch.serialization._package_registry.remove(entry)  # type: ignore[arg-type]


def loader() -> DataLoader:
    """Four batches of eight, always the same, never shuffled."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 4, generator=g, dtype=torch.float64)
    y = torch.randn(32, 2, generator=g, dtype=torch.float64)
    return DataLoader(TensorDataset(x, y), batch_size=8)


def quiet_trainer_kwargs(tmp_path: Path) -> dict[str, Any]:
    return {**QUIET, "default_root_dir": tmp_path}
