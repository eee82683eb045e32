"""Checks of the ``strategy`` and ``trainer`` config groups that Hydra's types cannot express.

:func:`check_config` runs in :func:`~lightning_gpupar.config.build_trainer` once the devices are chosen,
before the strategy or the Trainer exists. Each error names the key as a Hydra override, what is valid
and what to write; a value that only matters on one kind of machine (``min_free_memory`` without GPUs)
is checked on every machine, so a config fails where it is written, not where it is first used.
"""

from __future__ import annotations

from typing import Any

from hydra.utils import get_class
from omegaconf import DictConfig, ListConfig

from lightning_gpupar.devices import DeviceSelection
from lightning_gpupar.errors import GpuparError

#: The strategy names the checks know, as the strategies' ``strategy_name`` gives them.
STRATEGY_KINDS = ("single", "dp", "model_split", "ddp", "ddp_split")
#: What ``trainer.deterministic`` accepts (Lightning takes any truthy value as True).
_DETERMINISTIC = (None, True, False, "warn")


class ConfigValueError(GpuparError, ValueError):
    """A config value that cannot work; the message names the key, what is valid and a fix."""


def check_config(cfg: DictConfig, selection: DeviceSelection) -> None:
    """Check ``cfg.strategy`` and ``cfg.trainer`` against each other and the chosen devices."""
    check_trainer(cfg.trainer, strategy_kind(cfg.strategy))
    check_strategy(cfg.strategy, selection)
    _check_trainer_devices(cfg, selection)


def strategy_kind(strategy_cfg: DictConfig) -> str:
    """``single``, ``dp``, ``model_split``, ``ddp`` or ``ddp_split``: the registry name of what ``_target_``
    builds (a class of Lightning's own that is none of these counts as ``single``)."""
    target = strategy_cfg.get("_target_")
    name = None if target is None else getattr(get_class(str(target)), "strategy_name", None)
    return name if name in STRATEGY_KINDS else "single"


def check_trainer(trainer_cfg: DictConfig, kind: str) -> None:
    """Values Lightning accepts silently or fails on late (mid-training, or as ``ZeroDivisionError``)."""
    _at_least(trainer_cfg, "accumulate_grad_batches", 1, "1 (no accumulation) or more")
    _at_least(trainer_cfg, "log_every_n_steps", 0, "0 (never) or a step count")
    _at_least(trainer_cfg, "num_sanity_val_steps", -1, "-1 (the whole validation set), 0 or a count")
    clip = trainer_cfg.get("gradient_clip_val")
    if clip is not None and not (isinstance(clip, int | float) and not isinstance(clip, bool) and clip >= 0):
        raise ConfigValueError(
            f"trainer.gradient_clip_val={clip!r}: the clipping threshold must be a number >= 0 (a negative "
            "norm would flip the gradients). Write e.g. trainer.gradient_clip_val=1.0, or null for none."
        )
    deterministic = trainer_cfg.get("deterministic")
    if deterministic not in _DETERMINISTIC or (
        isinstance(deterministic, int | float) and not isinstance(deterministic, bool)
    ):
        raise ConfigValueError(
            f"trainer.deterministic={deterministic!r}: valid are null, true, false and warn "
            "(Lightning would take any other value as true). Write e.g. trainer.deterministic=true."
        )
    nodes = trainer_cfg.get("num_nodes", 1)
    if isinstance(nodes, int) and nodes > 1 and kind in ("single", "dp", "model_split"):
        raise ConfigValueError(
            f"trainer.num_nodes={nodes}, but strategy={kind} runs in one process on one machine, so "
            "the other nodes would never be used. Use strategy=ddp (or ddp_split) for several nodes, or "
            "trainer.num_nodes=1."
        )


def check_strategy(strategy_cfg: DictConfig, selection: DeviceSelection) -> None:
    """Strategy options that depend on the chosen devices."""
    kind = strategy_kind(strategy_cfg)
    if selection.cpu_stage and kind != "model_split":
        raise ConfigValueError(
            f"strategy.device_ids={strategy_cfg.device_ids!r}: 'cpu' beside GPU ids makes the CPU a stage "
            f"device of a split model, which only strategy=model_split has; strategy={kind} cannot use it. "
            "Remove 'cpu' from the list, or use strategy=model_split."
        )
    if kind in ("ddp", "ddp_split"):
        _check_backend_on(strategy_cfg.get("process_group_backend"), selection)
    if kind == "dp" and strategy_cfg.get("output_device") is not None:
        _check_output_device(strategy_cfg.output_device, selection)


def _check_trainer_devices(cfg: DictConfig, selection: DeviceSelection) -> None:
    """``trainer.devices`` (added with ``+``) must agree with ``strategy.device_ids``, which chooses them."""
    given = cfg.trainer.get("devices")
    if isinstance(given, ListConfig):
        given = list(given)
    if given is None or given == "auto":
        return
    chosen = selection.trainer_devices
    count = len(selection)
    if given in (chosen, count) or (isinstance(given, str) and given.strip() in (str(chosen), str(count))):
        return
    raise ConfigValueError(
        f"trainer.devices={given!r} contradicts strategy.device_ids={cfg.strategy.device_ids!r}, which "
        f"chose {count} device(s) ({', '.join(map(str, selection.devices))}). The app chooses devices with "
        f"strategy.device_ids only: drop trainer.devices and write strategy.device_ids={given!r} to get "
        "those devices."
    )


def _check_backend_on(backend: Any, selection: DeviceSelection) -> None:
    """Refuse nccl alone for CPU devices (``"nccl"``, ``"cuda:nccl"``): it moves CUDA tensors only."""
    names = (
        set()
        if backend is None
        else {part.split(":")[-1].strip().lower() for part in str(backend).split(",")}
    )
    if selection.accelerator != "cpu" or not names or not names <= {"nccl"}:
        return
    raise ConfigValueError(
        f"strategy.process_group_backend={backend!r} with CPU devices: nccl moves CUDA tensors only. Use "
        "strategy.process_group_backend=gloo (or null: gloo on the CPU, nccl on GPUs), or train on GPUs."
    )


def _check_output_device(wanted: Any, selection: DeviceSelection) -> None:
    from lightning_gpupar.strategies.dp import as_device

    device = as_device(wanted)
    if selection.accelerator == "cpu" and device.type == "cpu":
        return
    if device not in selection.devices:
        chosen = ", ".join(map(str, selection.devices))
        raise ConfigValueError(
            f"strategy.output_device={wanted!r} ({device}) is not one of the chosen devices ({chosen}). "
            "Write one of them, or null for the first."
        )


def _at_least(cfg: DictConfig, key: str, low: int, valid: str) -> None:
    value = cfg.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value < low:
        raise ConfigValueError(
            f"trainer.{key}={value}: valid is {valid}. Write e.g. trainer.{key}={max(low, 1)}."
        )
