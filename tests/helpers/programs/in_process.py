"""Our DDPStrategy inside the test process itself: one rank, and nothing left behind afterwards.

A multi-rank run must re-execute a script (see the other programs here); one rank needs no other
process, so tests that train in-process (the resume matrix) can still go through DDP's wrapper,
process group and checkpoint path. The callback destroys the process group and restores the
environment variables the launcher set, so later tests see a clean process.
"""

from __future__ import annotations

import os
from typing import Any

import lightning.pytorch as pl
import torch.distributed

from lightning_gpupar import DDPSplitStrategy, DDPStrategy


class LeaveNoTrace(pl.Callback):
    """At teardown: no process group, and ``os.environ`` as it was when this callback was made."""

    def __init__(self) -> None:
        self.environ = dict(os.environ)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(self.environ)


def in_process_ddp(devices_per_process: int = 1, **split: Any) -> dict[str, Any]:
    """Trainer arguments: DDP on one CPU rank, the loader's own order (no shuffling sampler).

    With ``devices_per_process=k`` (ddp_split) the one rank owns k CPU devices and splits its model.
    """
    return {
        "strategy": (
            DDPSplitStrategy(devices_per_process=devices_per_process, **split)
            if devices_per_process > 1
            else DDPStrategy(**split)
        ),
        "accelerator": "cpu",
        "devices": devices_per_process,
        "use_distributed_sampler": False,
        "callbacks": [LeaveNoTrace()],
    }
