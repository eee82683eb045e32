"""`strategy=ddp` from Hydra: the options reach DDP, devices come from strategy.device_ids."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from lightning_gpupar import DDPStrategy
from lightning_gpupar.config import build_trainer
from lightning_gpupar.devices import DeviceSelectionError

Compose = Callable[..., DictConfig]


def test_ddp_options_reach_the_strategy(compose_app: Compose) -> None:
    cfg = compose_app(
        "strategy=ddp",
        "trainer.accelerator=cpu",
        "strategy.device_ids=3",
        "strategy.find_unused_parameters=true",
        "strategy.static_graph=true",
        "strategy.gradient_as_bucket_view=true",
        "strategy.process_group_backend=gloo",
        "strategy.timeout=90",
    )
    strategy = build_trainer(cfg, logger=False).strategy
    assert isinstance(strategy, DDPStrategy)
    assert strategy.parallel_devices == [torch.device("cpu")] * 3
    assert strategy._ddp_kwargs == {
        "find_unused_parameters": True,
        "static_graph": True,
        "gradient_as_bucket_view": True,
    }
    assert (strategy.process_group_backend, strategy._timeout) == ("gloo", timedelta(seconds=90))


def test_auto_on_a_machine_without_gpus_means_two_processes(compose_app: Compose) -> None:
    strategy = build_trainer(compose_app("strategy=ddp", "trainer.accelerator=cpu"), logger=False).strategy
    assert isinstance(strategy, DDPStrategy) and strategy.num_processes == 2


def test_a_gpu_id_this_node_lacks_fails_before_any_trainer(
    compose_app: Compose, fake_gpus: Callable[..., object]
) -> None:
    fake_gpus(40, 40)
    with pytest.raises(DeviceSelectionError, match="no GPU with id 3"):
        build_trainer(compose_app("strategy=ddp", "trainer.accelerator=gpu", "strategy.device_ids=[0,3]"))


def test_a_misspelt_ddp_option_fails_at_composition(compose_app: Compose) -> None:
    with pytest.raises(
        ConfigCompositionException, match=r"Could not override 'strategy\.static_grpah'"
    ) as info:
        compose_app("strategy=ddp", "strategy.static_grpah=true")
    assert "Key 'static_grpah' not in 'DDPStrategyConfig'" in str(info.value.__cause__)
