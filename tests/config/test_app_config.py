"""The Hydra app's configuration: overrides that compose, overrides that must fail, and build_trainer."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from lightning_gpupar.checkpoint import AtomicCheckpointIO, CanonicalCheckpointMixin
from lightning_gpupar.config import build_trainer
from lightning_gpupar.devices import DeviceSelectionError, GPUInfo

Compose = Callable[..., DictConfig]


def test_defaults_choose_mlp_with_digits(compose_app: Compose) -> None:
    cfg = compose_app()
    assert cfg.model._target_ == "examples.models.MLPClassifier"
    assert cfg.data._target_ == "examples.data.DigitsDataModule"
    assert cfg.data.seed == cfg.seed


@pytest.mark.parametrize(
    ("model", "data_target", "images"),
    [
        ("cnn", "examples.data.DigitsDataModule", True),
        ("transformer", "examples.data.MajorityTokenDataModule", None),
    ],
)
def test_choosing_a_model_brings_its_data(
    compose_app: Compose, model: str, data_target: str, images: bool
) -> None:
    cfg = compose_app(f"model={model}")
    assert cfg.data._target_ == data_target
    assert cfg.data.get("as_images") == images


def test_overrides_reach_their_nodes(compose_app: Compose) -> None:
    cfg = compose_app(
        "model.lr=0.5", "data.batch_size=8", "trainer.max_epochs=1", "seed=3", "strategy.device_ids=[0,3]"
    )
    assert (cfg.model.lr, cfg.data.batch_size, cfg.trainer.max_epochs, cfg.data.seed) == (0.5, 8, 1, 3)
    assert list(cfg.strategy.device_ids) == [0, 3]


@pytest.mark.parametrize(
    ("override", "cause"),
    [
        ("model.lrr=0.1", "Key 'lrr' not in 'MLPConfig'"),
        ("trainer.max_epoch=3", "Key 'max_epoch' not in 'TrainerConfig'"),
        ("strategy.device_idz=1", "Key 'device_idz' not in 'DPStrategyConfig'"),
        ("model.lr=fast", "Value 'fast' of type 'str' could not be converted to Float"),
        ("trainer.max_epochs=1.5", "could not be converted to Integer"),
        ("data.batch_size=many", "Value 'many' of type 'str' could not be converted to Integer"),
    ],
)
def test_misspelt_keys_and_wrong_types_fail_at_composition(
    compose_app: Compose, override: str, cause: str
) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_app(override)
    assert isinstance(info.value.__cause__, OmegaConfBaseException)
    assert cause in str(info.value.__cause__)


def test_unknown_strategy_lists_the_available_ones(compose_app: Compose) -> None:
    with pytest.raises(Exception, match="nonexistent") as info:
        compose_app("strategy=nonexistent")
    options = (
        str(info.value).split("Available options in 'strategy':")[1].split("Config search path")[0].split()
    )
    # schemas live in their own group; one name per idea, no alias
    assert options == ["ddp", "ddp_split", "dp", "model_split", "single"]


def test_the_unreleased_split_alias_is_gone(compose_app: Compose) -> None:
    with pytest.raises(Exception, match="Could not find 'strategy/split'") as info:
        compose_app("strategy=split")
    assert "model_split" in str(info.value)  # Hydra's own list of the available options
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("lightning_gpupar.strategies.split")
    assert not hasattr(importlib.import_module("lightning_gpupar.strategies.single"), "SingleDeviceStrategy")


def test_build_trainer_single_cpu(compose_app: Compose) -> None:
    cfg = compose_app("strategy=single", "trainer.accelerator=cpu")
    trainer = build_trainer(cfg, logger=False, enable_progress_bar=False)
    assert trainer.strategy.root_device.type == "cpu"
    assert trainer.num_devices == 1


def test_single_strategy_has_the_checkpoint_guarantees(compose_app: Compose) -> None:
    trainer = build_trainer(compose_app("strategy=single", "trainer.accelerator=cpu"), logger=False)
    assert isinstance(trainer.strategy, CanonicalCheckpointMixin)
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)


def test_single_runs_on_the_chosen_gpu(compose_app: Compose, fake_gpus: Callable[..., list[GPUInfo]]) -> None:
    fake_gpus(40, 40, 40, 40)
    trainer = build_trainer(compose_app("strategy=single", "strategy.device_ids=[3]"), logger=False)
    assert trainer.strategy.root_device == torch.device("cuda", 3)


def test_single_refuses_several_devices(compose_app: Compose) -> None:
    with pytest.raises(ValueError, match=r"strategy=single runs on one device.*strategy=dp"):
        build_trainer(compose_app("strategy=single", "trainer.accelerator=cpu", "strategy.device_ids=2"))


def test_device_errors_surface_before_the_trainer(
    compose_app: Compose, fake_gpus: Callable[..., list[GPUInfo]]
) -> None:
    fake_gpus()
    with pytest.raises(DeviceSelectionError, match=r"trainer\.accelerator=cpu"):
        build_trainer(compose_app("strategy.device_ids=[3]"))
