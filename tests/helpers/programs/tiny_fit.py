"""Fit a tiny model with DDPStrategy on CPU processes; optionally make one rank raise.

    python tiny_fit.py --devices 2 [--num-nodes N] [--fail-rank R] [--kill-rank R] [--timeout S] [--out DIR]
        [--ckpt PATH]

``--kill-rank R``: rank R SIGKILLs itself at the third step (it prints nothing). With ``--out`` rank 0
writes the trained state dict to ``DIR/weights.pt``; with ``--ckpt`` the Trainer saves a checkpoint there
after fitting. ``--timeout`` is the process group's (seconds).
"""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import DDPStrategy


class Tiny(pl.LightningModule):
    def __init__(self, fail_rank: int | None = None, kill_rank: int | None = None) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.fail_rank = fail_rank
        self.kill_rank = kill_rank

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        if batch_idx == 2 and self.global_rank == self.fail_rank:
            raise RuntimeError(f"boom on rank {self.global_rank}")
        if batch_idx == 2 and self.global_rank == self.kill_rank:
            os.kill(os.getpid(), signal.SIGKILL)
        x, y = batch
        return nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_trainer(devices: int, num_nodes: int = 1, timeout: float = 60) -> pl.Trainer:
    """A quiet CPU Trainer with our DDPStrategy and a short process-group timeout."""
    return pl.Trainer(
        accelerator="cpu",
        devices=devices,
        num_nodes=num_nodes,
        strategy=DDPStrategy(timeout=timeout),
        max_epochs=1,
        limit_train_batches=6,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def make_data() -> DataLoader:
    data = TensorDataset(torch.randn(64, 4), torch.randn(64, 2))
    return DataLoader(data, batch_size=4)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--num-nodes", type=int, default=1)
    parser.add_argument("--fail-rank", type=int, default=None)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--ckpt", type=Path, default=None)
    args = parser.parse_args()

    pl.seed_everything(0)
    trainer = make_trainer(args.devices, args.num_nodes, args.timeout)
    model = Tiny(args.fail_rank, args.kill_rank)
    trainer.fit(model, make_data())
    print(f"rank {trainer.global_rank} of {trainer.world_size} finished")
    if args.ckpt is not None:
        trainer.save_checkpoint(args.ckpt)  # every rank calls it; the strategy decides who writes
    if args.out is not None and trainer.is_global_zero:
        torch.save(model.state_dict(), args.out / "weights.pt")


if __name__ == "__main__":
    main()
