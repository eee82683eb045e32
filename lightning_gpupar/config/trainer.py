"""Structured configs for the ``strategy`` and ``trainer`` groups, and ``build_trainer``.

The dataclasses are Hydra schemas: a YAML file in ``conf/strategy/`` extends one of them through its
defaults list, so a misspelt key or a wrong type fails at composition with Hydra's own message.
``strategy.device_ids`` is the one knob for devices; :func:`build_trainer` resolves it through
:mod:`lightning_gpupar.devices` before any Trainer exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from hydra.core.config_store import ConfigStore
from hydra.utils import instantiate
from lightning.pytorch.strategies import ParallelStrategy, SingleDeviceStrategy, Strategy
from omegaconf import DictConfig, OmegaConf

from lightning_gpupar.config.checks import check_config
from lightning_gpupar.devices import DeviceSelection, resolve_devices
from lightning_gpupar.model_split import ModelSplit
from lightning_gpupar.strategies.ddp import DEFAULT_TIMEOUT_S

#: Keys of a strategy config that choose devices; the rest are the strategy's constructor arguments.
DEVICE_KEYS = ("device_ids", "min_free_memory", "cpu_fallback")


@dataclass
class StrategyConfig:
    """Fields every strategy config has.

    ``_target_`` is the strategy class (``None``: Lightning's own single-device strategy).
    ``device_ids`` takes any request :func:`~lightning_gpupar.devices.resolve_devices` understands.
    ``cpu_fallback`` is how many CPU devices ``"auto"`` means on a machine without GPUs.
    """

    _target_: Any = None
    device_ids: Any = "auto"
    min_free_memory: str = "1GiB"
    cpu_fallback: int = 1


@dataclass
class SingleStrategyConfig(StrategyConfig):
    """One device, the best GPU or the CPU: see :mod:`lightning_gpupar.strategies.single`."""

    _target_: Any = "lightning_gpupar.strategies.single.SingleStrategy"
    device_ids: Any = "auto:1"


@dataclass
class DDPStrategyConfig(StrategyConfig):
    """One process per device, Lightning's DDP: see :class:`lightning_gpupar.strategies.ddp.DDPStrategy`.

    ``timeout`` is in seconds. On a machine without GPUs, ``"auto"`` means ``cpu_fallback`` processes.
    """

    _target_: Any = "lightning_gpupar.strategies.ddp.DDPStrategy"
    cpu_fallback: int = 2
    find_unused_parameters: bool = False
    static_graph: bool = False
    gradient_as_bucket_view: bool = False
    process_group_backend: str | None = None
    timeout: float = DEFAULT_TIMEOUT_S


def _split_schema_fields() -> list[tuple[str, Any, Any]]:
    """:class:`ModelSplit`'s fields as Hydra schema fields: typed where the type is plain (bool, int, str),
    else ``Any`` with a null default, so that Hydra parses dotted dict keys in ``strategy.placement=...``
    (null placement means ``auto``)."""
    plain = {"bool": bool, "int": int, "str": str}
    schema: list[tuple[str, Any, Any]] = []
    for option in dataclasses.fields(ModelSplit):
        kind = plain.get(str(option.type))
        schema.append((option.name, kind or Any, dataclasses.field(default=option.default if kind else None)))
    return schema


if TYPE_CHECKING:  # a class made at run time is opaque to mypy

    class ModelSplitFields:
        """How one model copy is split."""

else:
    #: How one model copy is split: exactly :class:`ModelSplit`'s fields, made from them.
    ModelSplitFields = dataclasses.make_dataclass("ModelSplitFields", _split_schema_fields())


@dataclass
class ModelSplitStrategyConfig(ModelSplitFields, StrategyConfig):
    """One model split over devices: :class:`~lightning_gpupar.strategies.model_split.ModelSplitStrategy`."""

    _target_: Any = "lightning_gpupar.strategies.model_split.ModelSplitStrategy"
    cpu_fallback: int = 2


@dataclass
class DDPSplitStrategyConfig(ModelSplitFields, DDPStrategyConfig):
    """DDP over device groups: each process owns ``devices_per_process`` devices holding one split copy
    (:class:`lightning_gpupar.strategies.ddp_split.DDPSplitStrategy`). Placement positions count within a
    process's group.
    """

    _target_: Any = "lightning_gpupar.strategies.ddp_split.DDPSplitStrategy"
    devices_per_process: int = 2
    cpu_fallback: int = 4


@dataclass
class DPStrategyConfig(StrategyConfig):
    """One process, a replica per device: see :class:`lightning_gpupar.strategies.dp.DataParallelStrategy`.

    ``"auto"`` means every GPU with enough free memory, or ``cpu_fallback`` CPU replicas without GPUs.
    """

    _target_: Any = "lightning_gpupar.strategies.dp.DataParallelStrategy"
    cpu_fallback: int = 2
    output_device: Any = None


@dataclass
class TrainerConfig:
    """The Trainer arguments the app exposes; devices and strategy come from the strategy config."""

    _target_: str = "lightning.pytorch.Trainer"
    accelerator: str = "auto"
    precision: Any = "32-true"
    max_epochs: int = 10
    max_steps: int = -1
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    num_sanity_val_steps: int = 2
    gradient_clip_val: Any = None
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 10
    num_nodes: int = 1
    deterministic: Any = None
    enable_progress_bar: bool = True
    enable_model_summary: bool = True


def register_configs(store: ConfigStore | None = None) -> None:
    """Register the schemas (group ``schema/strategy``, ``schema/trainer``) the YAML files extend."""
    store = store or ConfigStore.instance()
    store.store(group="schema/strategy", name="single", node=SingleStrategyConfig)
    store.store(group="schema/strategy", name="dp", node=DPStrategyConfig)
    store.store(group="schema/strategy", name="ddp", node=DDPStrategyConfig)
    store.store(group="schema/strategy", name="ddp_split", node=DDPSplitStrategyConfig)
    store.store(group="schema/strategy", name="model_split", node=ModelSplitStrategyConfig)
    store.store(group="schema/trainer", name="default", node=TrainerConfig)


def select_devices(strategy_cfg: DictConfig, accelerator: str) -> DeviceSelection:
    """Resolve ``strategy.device_ids`` for the given accelerator (raises DeviceSelectionError)."""
    return resolve_devices(
        strategy_cfg.device_ids,
        accelerator,
        default_cpu_count=strategy_cfg.cpu_fallback,
        min_free_memory=strategy_cfg.min_free_memory,
    )


def build_strategy(strategy_cfg: DictConfig) -> Strategy | str:
    """Instantiate the strategy from its config, without the device keys; ``"auto"`` when it has no target."""
    kwargs = OmegaConf.to_container(strategy_cfg, resolve=True)
    assert isinstance(kwargs, dict)
    for key in DEVICE_KEYS:
        kwargs.pop(key, None)
    if kwargs.get("_target_") is None:
        return "auto"
    strategy = instantiate(kwargs, _convert_="all")
    assert isinstance(strategy, Strategy)
    return strategy


def build_trainer(cfg: DictConfig, **trainer_kwargs: Any) -> pl.Trainer:
    """A Trainer from ``cfg.trainer`` and ``cfg.strategy``; ``trainer_kwargs`` (callbacks, logger...) win."""
    selection = select_devices(cfg.strategy, cfg.trainer.accelerator)
    check_config(cfg, selection)
    strategy = build_strategy(cfg.strategy)
    if (strategy == "auto" or isinstance(strategy, SingleDeviceStrategy)) and len(selection) > 1:
        raise ValueError(
            f"strategy=single runs on one device, but strategy.device_ids={cfg.strategy.device_ids!r} "
            f"selected {len(selection)}. Choose one device, or a parallel strategy "
            "(strategy=dp, strategy=ddp)."
        )
    if selection.cpu_stage and isinstance(strategy, ParallelStrategy):
        strategy.parallel_devices = list(selection.devices)  # Lightning's devices= names the GPUs only
    trainer = instantiate(
        cfg.trainer,
        accelerator=selection.accelerator,
        devices=selection.trainer_devices,
        strategy=strategy,
        **trainer_kwargs,
    )
    assert isinstance(trainer, pl.Trainer)
    return trainer
