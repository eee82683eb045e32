"""The Hydra layer: schemas and :func:`build_trainer` (:mod:`.trainer`), checks before training
(:mod:`.checks`) and the run-directory guard (:mod:`.run_dir`). See docs/app.md."""

from lightning_gpupar.config.checks import ConfigValueError, check_config, strategy_kind
from lightning_gpupar.config.trainer import (
    DDPSplitStrategyConfig,
    DDPStrategyConfig,
    DPStrategyConfig,
    ModelSplitFields,
    ModelSplitStrategyConfig,
    SingleStrategyConfig,
    StrategyConfig,
    TrainerConfig,
    build_strategy,
    build_trainer,
    register_configs,
    select_devices,
)

__all__ = [
    "ConfigValueError",
    "DDPSplitStrategyConfig",
    "DDPStrategyConfig",
    "DPStrategyConfig",
    "ModelSplitFields",
    "ModelSplitStrategyConfig",
    "SingleStrategyConfig",
    "StrategyConfig",
    "TrainerConfig",
    "build_strategy",
    "build_trainer",
    "check_config",
    "register_configs",
    "select_devices",
    "strategy_kind",
]
