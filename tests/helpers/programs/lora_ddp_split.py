"""Train the tiny LoRA Llama (tests/helpers/lora.py) with ddp_split: 2 processes x 2 CPU devices.

    python lora_ddp_split.py OUT_DIR [auto|device_map]

Rank r trains on rows r, r+2, ... of the token data in batches of 2 (so the two ranks' batch k together are
the single-device reference's batch k of 4), its copy split over its 2 devices by placement='auto' or, with
``device_map``, by the hf_device_map each rank's model carries (dispatched with accelerate's hooks, the
values positions in the process's group). Every rank writes ``OUT_DIR/rank<r>.pt``: its losses, the
positions its plan used (by entry), its final adapter weights.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import DDPSplitStrategy
from tests.helpers.lora import LoraLM, dispatch, token_loader, trainable_weights


class Positions(pl.Callback):
    """The positions the split's plan uses, read once training starts (the plan is gone at teardown)."""

    def __init__(self, strategy: DDPSplitStrategy) -> None:
        self.strategy = strategy
        self.positions: list[int] = []
        self.entries: dict[str, int] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert self.strategy.applied is not None
        plan = self.strategy.applied.plan
        self.positions = sorted({e.position for e in plan.entries})
        self.entries = {e.path: e.position for e in plan.entries}


def main() -> None:
    out = Path(sys.argv[1])
    placement = sys.argv[2] if len(sys.argv) > 2 else "auto"
    module = LoraLM(layers=2)
    if placement == "device_map":
        dispatch(module)
    strategy = DDPSplitStrategy(timeout=60, devices_per_process=2, placement=placement)
    recorder = Positions(strategy)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=strategy,
        callbacks=[recorder],
        max_epochs=1,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    (rows,) = token_loader().dataset.tensors  # type: ignore[attr-defined]
    mine = rows[trainer.global_rank :: 2]
    trainer.fit(module, DataLoader(TensorDataset(mine), batch_size=2))
    torch.save(
        {
            "losses": module.losses,
            "positions": recorder.positions,
            "entries": recorder.entries,
            "weights": trainable_weights(module),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
