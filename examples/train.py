"""Train an example LightningModule with the strategy and devices chosen in Hydra's config.

    python examples/train.py                                   # MLP on digits, default strategy
    python examples/train.py model=transformer trainer.max_epochs=3
    python examples/train.py strategy=dp trainer.accelerator=cpu strategy.device_ids=2

Logs and checkpoints go under Hydra's run directory; at the end the test metrics and the best
checkpoint's path are printed.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `examples.*` targets, run from anywhere

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from omegaconf import DictConfig, OmegaConf

import lightning_gpupar  # noqa: F401  (registers our strategies)
from examples.checks import validate_app_config
from examples.schema import register_app_configs
from lightning_gpupar.config import build_trainer

register_app_configs()
log = logging.getLogger(__name__)


def train(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Fit, test, and return the test metrics (plus the best checkpoint's path, as ``best_ckpt``)."""
    pl.seed_everything(cfg.seed, workers=True)
    log.info("model config (every rank logs the one it trains):\n%s", OmegaConf.to_yaml(cfg.model).strip())
    model = instantiate(cfg.model, _convert_="all")
    data = instantiate(cfg.data)
    checkpoint = ModelCheckpoint(
        dirpath=output_dir / "checkpoints", monitor=cfg.monitor, mode="min", save_last=True
    )
    trainer = build_trainer(
        cfg,
        default_root_dir=str(output_dir),
        logger=CSVLogger(str(output_dir), name="logs"),
        callbacks=[checkpoint],
    )
    if trainer.is_global_zero:
        devices = ", ".join(
            str(d)
            for d in getattr(trainer.strategy, "parallel_devices", None) or [trainer.strategy.root_device]
        )
        print(f"strategy: {type(trainer.strategy).__name__} on {devices}")
    trainer.fit(model, datamodule=data)
    metrics: dict[str, float] = {}
    if cfg.test:
        (results,) = trainer.test(model, datamodule=data, ckpt_path="best", verbose=False)
        metrics = {k: float(v) for k, v in results.items()}
    if trainer.is_global_zero:
        for name, value in sorted(metrics.items()):
            print(f"{name}: {value:.4f}")
        print(f"best checkpoint: {checkpoint.best_model_path}")
    return metrics


@hydra.main(config_path="../conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    validate_app_config(cfg)  # the model, data and app keys; build_trainer checks strategy and trainer
    metrics = train(cfg, Path(HydraConfig.get().runtime.output_dir))
    return metrics.get("test_acc")  # the value a sweeper would optimise


if __name__ == "__main__":
    main()
