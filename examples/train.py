"""Train an example LightningModule with the strategy and devices chosen in Hydra's config.

    python examples/train.py                                   # MLP on digits, default strategy
    python examples/train.py model=transformer trainer.max_epochs=3
    python examples/train.py strategy=dp trainer.accelerator=cpu strategy.device_ids=2

Logs and checkpoints go under Hydra's run directory; at the end the test metrics and the best
checkpoint's path are printed.
"""

from __future__ import annotations

import logging
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples.*` targets, run from anywhere

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

import lightning_gpupar  # noqa: F401  (registers our strategies)
from examples.checks import monitor_mode, validate_app_config
from examples.finite import FiniteLossCheck
from examples.resume import InterruptCheckpoint, RunDirCheckpoint, resolve_ckpt_path
from examples.run_facts import RunFacts
from examples.schema import register_app_configs
from lightning_gpupar.config import build_trainer

register_app_configs()
#: The shell's status for a process ended by SIGTERM (128 + 15), which schedulers read as "terminated".
SIGTERM_EXIT_STATUS = 128 + signal.SIGTERM
log = logging.getLogger(__name__)


def train(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Fit, then test the best checkpoint (or the final weights when there is none); the test metrics."""
    checkpoint_dir = output_dir / "checkpoints"
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, checkpoint_dir)  # a wrong path fails before training
    pl.seed_everything(cfg.seed, workers=True)
    log.info("model config (every rank logs the one it trains):\n%s", OmegaConf.to_yaml(cfg.model).strip())
    model = instantiate(cfg.model, _convert_="all")
    data = instantiate(cfg.data)
    mode = monitor_mode(cfg)
    checkpoint = RunDirCheckpoint(dirpath=checkpoint_dir, monitor=cfg.monitor, mode=mode, save_last=True)
    callbacks: list[Callback] = [checkpoint, InterruptCheckpoint(checkpoint_dir), RunFacts(cfg)]
    if cfg.stop_on_nonfinite_loss:
        callbacks.append(FiniteLossCheck())
    if cfg.checkpoint_every_n_steps:  # last.ckpt mid-epoch too; the data loader resumes where it was
        every_n = RunDirCheckpoint(
            dirpath=checkpoint_dir,
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            save_top_k=0,
            save_last=True,
        )
        every_n.CHECKPOINT_NAME_LAST = "last-step"  # ckpt_path=last takes the newer of last*.ckpt
        callbacks.append(every_n)
    trainer = build_trainer(
        cfg,
        default_root_dir=str(output_dir),
        logger=CSVLogger(str(output_dir), name="logs"),
        callbacks=callbacks,
    )
    if trainer.is_global_zero:
        devices = ", ".join(
            str(d)
            for d in getattr(trainer.strategy, "parallel_devices", None) or [trainer.strategy.root_device]
        )
        print(f"strategy: {type(trainer.strategy).__name__} on {devices}")
        better = "highest" if mode == "max" else "lowest"
        print(
            f"checkpoint selection: the best is the one with the {better} {cfg.monitor} (monitor_mode={mode})"
        )
    if ckpt_path is not None and trainer.is_global_zero:
        where = (
            f"last = {ckpt_path} (the newest last*.ckpt that loads)" if cfg.ckpt_path == "last" else ckpt_path
        )
        print(f"resuming from: {where}")
    trainer.fit(model, datamodule=data, ckpt_path=ckpt_path)
    best = checkpoint.best_model_path or None
    metrics: dict[str, float] = {}
    if cfg.test:
        if best is None and trainer.is_global_zero:
            print(
                f"no best checkpoint (no {cfg.monitor} was logged: {_why_no_best(trainer)}); testing the "
                f"weights at the end of training (step {trainer.global_step})."
            )
        results = trainer.test(model, datamodule=data, ckpt_path=best, verbose=False)
        metrics = {k: float(v) for k, v in results[0].items()} if results else {}
    if trainer.is_global_zero:
        for name, value in sorted(metrics.items()):
            print(f"{name}: {value:.4f}")
        print(f"best checkpoint: {best or 'none'}")
    return metrics


def _why_no_best(trainer: pl.Trainer) -> str:
    if getattr(trainer, "fast_dev_run", False):
        return "fast_dev_run saves no checkpoints"
    if trainer.global_step == 0:
        return "training ran no step (trainer.max_epochs=0 or trainer.max_steps=0)"
    return "training ended before the first validation"


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    validate_app_config(cfg)  # the model, data and app keys; build_trainer checks strategy and trainer
    try:
        metrics = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    except SIGTERMException:  # Lightning's is a SystemExit with status 0: a scheduler would see success
        log.warning("Stopped by SIGTERM; continue with ckpt_path=last. Exit status %d.", SIGTERM_EXIT_STATUS)
        sys.exit(SIGTERM_EXIT_STATUS)
    return metrics.get("test_acc")  # the value a sweeper would optimise


if __name__ == "__main__":
    main()
