"""Stop training at the first training loss that is NaN or infinite, before its backward.

Lightning trains on with a NaN loss (its weights become NaN, the run exits 0, and the app would report a
"best checkpoint" and a test accuracy). :class:`FiniteLossCheck` looks at every loss before its backward
and raises :class:`NonFiniteLossError` naming the step, so the weights stay those of the last finite
step. Under DDP the ranks agree first (a loss may be NaN on one rank only). The app turns it on with
``stop_on_nonfinite_loss=true`` (the default).
"""

from __future__ import annotations

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback


class NonFiniteLossError(FloatingPointError):
    """The training loss was NaN or infinite; the message names the step, epoch and batch."""


class FiniteLossCheck(Callback):
    """Raise :class:`NonFiniteLossError` at the first non-finite training loss, before its backward."""

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        finite = bool(torch.isfinite(loss.detach()).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            return
        value = loss.detach().float().cpu()
        shown = (
            "not finite on another rank"
            if finite
            else (str(value.item()) if value.numel() == 1 else "not finite")
        )
        raise NonFiniteLossError(
            f"The training loss is {shown} at step {trainer.global_step} (epoch {trainer.current_epoch}, "
            f"batch {trainer.fit_loop.epoch_loop.batch_idx}); training stopped before "
            "this step's backward, so no weights were changed by it. Lower model.lr, check the data, or set "
            "stop_on_nonfinite_loss=false to train on regardless."
        )
