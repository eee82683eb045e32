"""strategy=dp picks exactly the devices the user names: Trainer and Hydra, on mocked GPUs."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import lightning.pytorch as pl
import torch

from lightning_gpupar import DataParallelStrategy
from lightning_gpupar.devices import GPUInfo
from lightning_gpupar.dp.replicate import replicate
from tests.helpers.equivalence import TinyNet
from tests.helpers.hydra_app import build_trainer

if TYPE_CHECKING:
    from omegaconf import DictConfig

Compose = Callable[..., "DictConfig"]


def test_trainer_uses_exactly_the_named_gpus(fake_gpus: Callable[..., list[GPUInfo]]) -> None:
    fake_gpus(80, 80, 80, 80)
    trainer = pl.Trainer(accelerator="gpu", devices=[0, 3], strategy="dp", logger=False)
    assert isinstance(trainer.strategy, DataParallelStrategy)
    assert trainer.strategy.parallel_devices == [torch.device("cuda", 0), torch.device("cuda", 3)]
    assert trainer.strategy.root_device == torch.device("cuda", 0)
    assert trainer.strategy.output_device == torch.device("cuda", 0)


def test_hydra_device_ids_choose_the_gpus(
    compose_app: Compose, fake_gpus: Callable[..., list[GPUInfo]]
) -> None:
    fake_gpus(80, 80, 80, 80)
    trainer = build_trainer(
        compose_app("strategy=dp", "strategy.device_ids=[0,3]", "strategy.output_device=3")
    )
    assert isinstance(trainer.strategy, DataParallelStrategy)
    assert trainer.strategy.parallel_devices == [torch.device("cuda", 0), torch.device("cuda", 3)]
    assert trainer.strategy.output_device == torch.device("cuda", 3)


def test_hydra_auto_takes_the_gpus_with_most_free_memory(
    compose_app: Compose, fake_gpus: Callable[..., list[GPUInfo]]
) -> None:
    fake_gpus(20, 70, 0.1, 50)
    trainer = build_trainer(compose_app("strategy=dp"))
    assert trainer.strategy.parallel_devices == [torch.device("cuda", i) for i in (1, 3, 0)]


def test_hydra_cpu_replicas(compose_app: Compose) -> None:
    trainer = build_trainer(compose_app("strategy=dp", "trainer.accelerator=cpu", "strategy.device_ids=2"))
    assert isinstance(trainer.strategy, DataParallelStrategy)
    assert trainer.strategy.parallel_devices == [torch.device("cpu")] * 2


def test_default_app_config_uses_dp_with_two_cpu_replicas_without_gpus(compose_app: Compose) -> None:
    cfg = compose_app()
    assert cfg.strategy._target_.endswith("DataParallelStrategy")
    if not torch.cuda.is_available():
        trainer = build_trainer(cfg)
        assert trainer.strategy.parallel_devices == [torch.device("cpu")] * 2


def test_each_replica_sees_its_own_device() -> None:
    module = TinyNet()
    replicas = replicate(module, [torch.device("cpu"), torch.device("meta")])
    assert [r.device for r in replicas] == [torch.device("cpu"), torch.device("meta")]
    assert next(replicas[1].model.parameters()) is replicas[1].model[0].weight  # its own copies (issue 20)
    assert replicas[1].model[0].weight.device.type == "meta"
    assert module.device == torch.device("cpu")
