"""Train a float64 MLP with DDPStrategy on 2 CPU processes and record what a step produced.

    python equivalence.py OUT_DIR STEPS BATCH [ddp|ddp_split|ddp_split_1f1b] [cpu|gpu] [PROCESSES] [CHUNKS]
        [DEVICES]

Every rank writes ``OUT_DIR/rank<r>.pt``: its first-step loss, its gradients after the first backward
(already all-reduced by DDP), and its weights after ``STEPS`` optimizer steps. The data and the
initial weights come from :func:`problem`, which the test uses for the single-device reference.
``ddp_split`` runs 2 processes x 2 CPU devices, each copy split in two stages and pipelined in 2
micro-batches; each rank also records the stage positions and how many micro-batches stage 0 ran.
With ``gpu`` the processes train on GPUs 0.. with NCCL (``PROCESSES`` of them, default 2; ``CHUNKS``
micro-batches for ``ddp_split``, default 2). ``ddp_split_1f1b``: ``ddp_split`` with ``schedule="1f1b"``.
``DEVICES`` names the devices instead (``cuda:0,cuda:0``: one process whose ddp_split group is one GPU
twice).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import DDPSplitStrategy, DDPStrategy

LR = 0.05


def problem() -> tuple[nn.Module, TensorDataset]:
    """The network (seeded init, float64) and the data every run uses."""
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)).double()
    data = TensorDataset(
        torch.randn(96, 6, generator=generator, dtype=torch.float64),
        torch.randint(0, 3, (96,), generator=generator),
    )
    return net, data


def make_optimizer(params: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=LR, momentum=0.9)


class Recorder(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.first_loss: Tensor | None = None
        self.first_grads: dict[str, Tensor] = {}

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.first_loss is None:  # the step's loss (under 1F1B, training_step ran per micro-batch)
            self.first_loss = outputs["loss"].detach().clone()

    def on_after_backward(self) -> None:
        if not self.first_grads:
            grads = {n: p.grad for n, p in self.net.named_parameters()}
            self.first_grads = {n: g.detach().clone() for n, g in grads.items() if g is not None}

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return make_optimizer(self.parameters())


def main() -> None:
    out, steps, batch = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    net, data = problem()
    model = Recorder(net)
    split = len(sys.argv) > 4 and sys.argv[4].startswith("ddp_split")
    schedule = "1f1b" if split and sys.argv[4] == "ddp_split_1f1b" else "gpipe"
    accelerator = sys.argv[5] if len(sys.argv) > 5 else "cpu"
    processes = int(sys.argv[6]) if len(sys.argv) > 6 else 2
    chunks = int(sys.argv[7]) if len(sys.argv) > 7 else 2
    # DEVICES, e.g. cuda:0,cuda:0: the devices themselves (a ddp_split group on one GPU twice)
    chosen = [torch.device(d) for d in sys.argv[8].split(",")] if len(sys.argv) > 8 else None
    strategy = (
        DDPSplitStrategy(
            timeout=60,
            devices_per_process=2,
            placement={"net.0-1": 0, "net.2": 1},
            chunks=chunks,
            parallel_devices=chosen,
            schedule=schedule,
        )
        if split
        else DDPStrategy(timeout=60)
    )
    calls: list[int] = []
    net[0].register_forward_hook(lambda module, args, out: calls.append(len(args[0])))
    positions: dict[str, int | None] = {}

    class Positions(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            applied = getattr(strategy, "applied", None)  # plain DDP places nothing
            positions.update({p: applied.plan.position_of(p) for p in ("net.0", "net.2")} if applied else {})

    count = processes * (2 if split else 1)
    trainer = pl.Trainer(
        accelerator=accelerator,
        devices="auto" if chosen else count if accelerator == "cpu" else list(range(count)),
        strategy=strategy,
        callbacks=[Positions()],
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(data, batch_size=batch))
    torch.save(
        {
            "loss": model.first_loss,
            "grads": model.first_grads,
            "weights": {n: p.detach().clone() for n, p in net.named_parameters()},
            "positions": positions,
            "microbatch_sizes": calls,
            "backend": strategy._process_group_backend,
            "devices": sorted({str(p.device) for p in net.parameters()}),
        },
        out / f"rank{trainer.global_rank}.pt",
    )


if __name__ == "__main__":
    main()
