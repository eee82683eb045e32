"""DataParallelStrategy step time: one device against Lightning's single device, 2 CPU replicas against 1.

    python benchmarks/bench_dp.py [--rounds 5] [--steps 30]

Same model, same global batch in every variant. Target: dp on one device <= 1.03x single device.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_gpupar  # noqa: F401
from benchmarks.common import fit_step_times, interleaved, report


class Net(LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(
            nn.Linear(256, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
        )

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=1024)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(args.batch * 8, 256, generator=g), torch.randint(0, 10, (args.batch * 8,), generator=g)
    )
    loader = DataLoader(data, batch_size=args.batch)
    accelerator = "gpu" if torch.cuda.is_available() else "cpu"

    def variant(**kwargs: Any) -> Any:
        kwargs.setdefault("accelerator", accelerator)
        return lambda: fit_step_times(Net(args.width), loader, args.steps, **kwargs)

    per_round = interleaved(
        {
            "lightning single device": variant(devices=1),
            "dp, 1 device": variant(strategy="dp", devices=1),
            "dp, 2 CPU replicas": variant(strategy="dp", devices=2, accelerator="cpu"),
            "lightning single device (CPU)": variant(devices=1, accelerator="cpu"),
        },
        args.rounds,
    )
    report(
        f"DataParallelStrategy, batch {args.batch}, MLP width {args.width}",
        per_round,
        {
            "dp 1 device / single (target <= 1.03)": ("dp, 1 device", "lightning single device"),
            "dp 2 CPU replicas / 1 CPU device": ("dp, 2 CPU replicas", "lightning single device (CPU)"),
        },
        name="dp",
    )


if __name__ == "__main__":
    main()
