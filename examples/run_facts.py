"""What a resumed run changed: the app's settings kept in every checkpoint, compared on resume.

:class:`RunFacts` writes the settings that decide what a run trains on (the data split and its seed, the
batch size, the learning rate, the seed, the device and process counts) into each checkpoint. Resuming
with other values is refused or reported before the first step, naming the old and the new value:

- the data (``data.seed``, which follows ``seed``, the fractions, the data set): refused, since the
  train/val/test split would be drawn anew and samples trained on could land in validation or test;
- ``model.lr``: the resumed optimizer takes the new rate (the checkpoint's optimizer state keeps the old
  one otherwise); refused when the model has learning-rate schedulers;
- ``data.batch_size``, the device or process count, ``seed``: reported (at a mid-epoch checkpoint a new
  batch size or process count is refused by :class:`~examples.resume.ResumableDataLoader`).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from omegaconf import DictConfig, OmegaConf

#: Where the facts live in a checkpoint.
CHECKPOINT_KEY = "app_run_facts"


class ResumeMismatchError(ValueError):
    """The checkpoint's run trained on other settings than these, in a way that cannot continue."""


class RunFacts(Callback):
    """Keep the run's settings in each checkpoint; on resume refuse, apply or report what changed."""

    def __init__(self, cfg: DictConfig) -> None:
        data = OmegaConf.to_container(cfg.data, resolve=True)
        assert isinstance(data, dict)
        self.facts: dict[str, Any] = {
            "data": {f"data.{k!s}": v for k, v in data.items() if k != "batch_size"},
            "data.batch_size": data.get("batch_size"),
            "model.lr": cfg.model.get("lr"),
            "seed": cfg.seed,
        }
        self._changed: dict[str, tuple[Any, Any]] = {}
        self.old_checkpoint = False

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        strategy = trainer.strategy
        devices = getattr(strategy, "parallel_devices", None) or [strategy.root_device]
        self.facts["processes"] = trainer.world_size
        self.facts["devices"] = len(devices) * trainer.num_nodes

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        checkpoint[CHECKPOINT_KEY] = self.facts

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        old = checkpoint.get(CHECKPOINT_KEY)
        if old is None:
            self.old_checkpoint = True
            return
        data_changes = _changes(old.get("data", {}), self.facts["data"])
        if data_changes:
            raise ResumeMismatchError(
                f"The checkpoint's run trained on other data: {_listed(data_changes)} (checkpoint -> now). "
                "The train/val/test split would be drawn anew, so samples it trained on could land in "
                "validation or test. Resume with the checkpoint's values (data.seed follows seed), or "
                "start a new run (ckpt_path=null)."
            )
        keys = ("model.lr", "data.batch_size", "processes", "devices", "seed")
        self._changed = _changes({k: old.get(k) for k in keys}, {k: self.facts.get(k) for k in keys})

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        changed, self._changed = self._changed, {}
        if "model.lr" in changed:
            _apply_lr(trainer, *changed["model.lr"])
        if not trainer.is_global_zero:
            return
        if self.old_checkpoint:
            print(
                "resume: the checkpoint holds no record of its run's settings (written by an older app); "
                "nothing was compared."
            )
        if changed:
            lines = [
                f"  {key}: {old} -> {new}{_MEANING[key].format(old=old, new=new)}"
                for key, (old, new) in changed.items()
            ]
            print(
                "resume: settings changed since the checkpoint (checkpoint -> now):\n" + "\n".join(lines),
                flush=True,
            )


_MEANING = {
    "model.lr": " (the resumed optimizer uses {new})",
    "data.batch_size": " (batches of {new} from here on)",
    "processes": " (each step now takes data.batch_size samples on each of {new} processes)",
    "devices": "",
    "seed": " (the weights come from the checkpoint; only random draws from here on differ)",
}


def _apply_lr(trainer: pl.Trainer, old: float, new: float) -> None:
    if trainer.lr_scheduler_configs:
        raise ResumeMismatchError(
            f"model.lr changed from {old} to {new}, but the model has learning-rate schedulers, whose state "
            f"in the checkpoint is built on lr={old}. Resume with model.lr={old}, or start a new run."
        )
    for optimizer in trainer.optimizers:
        for group in optimizer.param_groups:
            group["lr"] = new


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {key: (old.get(key), value) for key, value in new.items() if old.get(key) != value}


def _listed(changes: dict[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
