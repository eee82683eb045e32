"""When does a split fit first touch CUDA? Run in a fresh process (no earlier test initialised CUDA).

    python cuda_context_program.py

Two fits on the CPU accelerator, each printing whether CUDA was initialised before placement (the
``setup`` hook) and after it (``on_fit_start``): ``map``: devices [cpu, cuda:0], the output on the CPU,
one stage on cuda:0; ``time``: ``balance="time"`` over [cpu, cpu], which must never touch a GPU.
Prints one JSON line: ``{case: [before placement, after placement, after the fit]}``.
"""

from __future__ import annotations

import json
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import ModelSplitStrategy

QUIET: dict[str, Any] = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}


class Chain(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.example_input_array = torch.randn(4, 8)
        self.seen: list[bool] = []

    def setup(self, stage: str) -> None:
        self.seen.append(torch.cuda.is_initialized())

    def on_fit_start(self) -> None:
        self.seen.append(torch.cuda.is_initialized())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def fit(strategy: ModelSplitStrategy) -> list[bool]:
    module = Chain()
    loader = DataLoader(TensorDataset(torch.randn(8, 8)), batch_size=4)
    pl.Trainer(accelerator="cpu", strategy=strategy, max_steps=2, **QUIET).fit(module, loader)
    return [*module.seen, torch.cuda.is_initialized()]


def main() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    seen = {"time": fit(ModelSplitStrategy("auto", chunks=2, balance="time", parallel_devices=[cpu, cpu]))}
    seen["map"] = fit(ModelSplitStrategy({"model.0": 1, "model.1-2": 0}, parallel_devices=[cpu, gpu]))
    print(json.dumps(seen))


if __name__ == "__main__":
    main()
