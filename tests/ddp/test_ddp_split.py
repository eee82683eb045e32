"""strategy=ddp_split: device groups per process, checks before any process starts, one rank in-process.

Multi-process equivalence, Hydra runs, sweeps and torchrun for ddp_split live beside ddp's in
test_ddp_equivalence.py and test_ddp_app.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_gpupar import DDPSplitStrategy, DDPStrategy
from lightning_gpupar.ddp.launcher import DDPLaunchError
from lightning_gpupar.devices import GPUInfo
from lightning_gpupar.model_split import PlacementError
from tests.helpers.equivalence import TinyNet, make_data
from tests.helpers.hydra_app import build_trainer
from tests.helpers.programs.in_process import in_process_ddp
from tests.helpers.trainer import QUIET as QUIET_TRAINER

if TYPE_CHECKING:
    from omegaconf import DictConfig

Compose = Callable[..., "DictConfig"]
QUIET: dict[str, Any] = {**QUIET_TRAINER, "max_steps": 1}


def test_registered_name_gives_groups_of_two(fake_gpus: Callable[..., list[GPUInfo]]) -> None:
    fake_gpus(80, 80, 80, 80)
    trainer = pl.Trainer(accelerator="gpu", devices=[0, 1, 2, 3], strategy="ddp_split", logger=False)
    strategy = trainer.strategy
    assert isinstance(strategy, DDPStrategy) and strategy.devices_per_process == 2
    assert strategy.num_processes == 2 and trainer.world_size == 2
    assert strategy.parallel_devices == [torch.device("cuda", 0), torch.device("cuda", 2)]
    assert strategy.device_group == [torch.device("cuda", 0), torch.device("cuda", 1)]  # local rank 0
    assert strategy.determine_ddp_device_ids() is None  # torch DDP over a multi-device module
    assert strategy.distributed_sampler_kwargs == {"num_replicas": 2, "rank": 0}


def test_hydra_config_as_the_issue_writes_it(compose_app: Compose) -> None:
    cfg = compose_app(
        "strategy=ddp_split",
        "trainer.accelerator=cpu",
        "strategy.device_ids=4",
        "strategy.devices_per_process=2",
        "model=transformer",
        "strategy.placement={model.embed:0,model.blocks.0-1:0,model.blocks.2-3:1,model.head:1}",
        "strategy.chunks=4",
    )
    strategy = build_trainer(cfg).strategy
    assert isinstance(strategy, DDPStrategy)
    assert (strategy.num_processes, strategy.devices_per_process, strategy.split.chunks) == (2, 2, 4)
    assert list(strategy.split.placement) == [
        "model.embed",
        "model.blocks.0-1",
        "model.blocks.2-3",
        "model.head",
    ]


# -- refused before any process starts ----------------------------------------------------------------


def test_device_count_must_be_a_multiple_of_the_group_size() -> None:
    with pytest.raises(
        DDPLaunchError, match=r"devices_per_process=2, but 3 device\(s\).*Choose 2 or 4 devices"
    ):
        pl.Trainer(
            accelerator="cpu", devices=3, strategy=DDPSplitStrategy(devices_per_process=2), logger=False
        )


def test_a_position_outside_the_group_would_cross_process_groups() -> None:
    with pytest.raises(
        DDPLaunchError, match=r"position\(s\) \[2\] lie outside.*0\.\.1.*cross process groups"
    ):
        DDPSplitStrategy(devices_per_process=2, placement={"model.0": 0, "model.2": 2})


def test_plain_ddp_takes_no_split_options_and_never_builds_another_class() -> None:
    with pytest.raises(DDPLaunchError, match=r"placement, chunks.*DDPSplitStrategy\(devices_per_process=k"):
        DDPStrategy(placement={"model.0": 0}, chunks=2)
    with pytest.raises(DDPLaunchError, match=r"got devices_per_process.*Use DDPSplitStrategy"):
        DDPStrategy(devices_per_process=2)
    assert type(DDPStrategy()) is DDPStrategy
    for wrong in (0, 1, True):
        with pytest.raises(DDPLaunchError, match=f"devices_per_process={wrong}"):
            DDPSplitStrategy(devices_per_process=wrong)


def test_chunks_larger_than_the_per_process_batch_fail_before_the_first_step() -> None:
    kwargs = in_process_ddp(devices_per_process=2, chunks=4)
    with pytest.raises(PlacementError, match=r"chunks=4 micro-batches.*3 samples \(per process\)"):
        pl.Trainer(**QUIET, **kwargs).fit(TinyNet(), DataLoader(make_data(12), batch_size=3))


# -- one rank in this process -----------------------------------------------------------------------------


def test_one_rank_splits_its_copy_over_its_group() -> None:
    module = TinyNet()
    kwargs = in_process_ddp(devices_per_process=2, placement={"model.0-1": 0, "model.2": 1}, chunks=2)
    seen: list[int] = []
    module.model[0].register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    pl.Trainer(**QUIET, **kwargs).fit(module, DataLoader(make_data(8), batch_size=8))
    assert seen == [4, 4], "each batch ran as two micro-batches"
    assert len(module.grads) == 1 and module.grads[0]["model.2.weight"].abs().sum() > 0


def test_a_placement_that_leaves_a_device_unused_is_reported() -> None:
    kwargs = in_process_ddp(devices_per_process=2, placement={"model": 0})
    with pytest.warns(UserWarning, match=r"leaves device position\(s\) \[1\].*unused"):
        pl.Trainer(**QUIET, **kwargs).fit(TinyNet(), DataLoader(make_data(8), batch_size=8))


def test_a_gpu_this_node_lacks_is_named_before_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    strategy = DDPStrategy()
    strategy.parallel_devices = [torch.device("cuda", 3)]
    with pytest.raises(
        DDPLaunchError, match=r"should train on cuda:3, but this node sees 2 GPU\(s\) \(ids 0\.\.1\)"
    ):
        strategy.setup_environment()


def test_every_gpu_of_the_group_is_checked_before_the_process_group(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    strategy = DDPSplitStrategy(devices_per_process=2)
    strategy.parallel_devices = [torch.device("cuda", 3), torch.device("cuda", 1)]
    assert strategy.root_device == torch.device("cuda", 1)  # the output device exists; cuda:3 does not
    with pytest.raises(DDPLaunchError, match=r"should train on cuda:3, but this node sees 2 GPU\(s\)"):
        strategy.setup_environment()


@pytest.mark.parametrize(
    ("split", "batch_size", "message"),
    [
        ({"placement": {"model.0-1": 0, "model.head": 1}}, 8, r"model\.head"),
        ({"chunks": 4}, 3, r"chunks=4 micro-batches.*3 samples"),
    ],
)
def test_two_process_mistakes_fail_before_any_process_starts(
    split: dict[str, Any], batch_size: int, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[Any] = []
    monkeypatch.setattr("subprocess.Popen", lambda *a, **k: started.append(a))  # no child may start
    environ = dict(os.environ)
    strategy = DDPSplitStrategy(devices_per_process=2, **split)
    trainer = pl.Trainer(accelerator="cpu", devices=4, strategy=strategy, **QUIET)
    try:
        with pytest.raises(PlacementError, match=message):
            trainer.fit(TinyNet(), DataLoader(make_data(12), batch_size=batch_size))
    finally:
        os.environ.clear()
        os.environ.update(environ)
    assert started == []


class TinyData(pl.LightningDataModule):
    """Training batches of ``batch_size`` samples from a datamodule, as examples/train.py passes them."""

    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(12), batch_size=self.batch_size)


def test_chunks_against_a_datamodules_batch_fail_before_any_process_starts(
    compose_app: Compose, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_child(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a child process was started")

    monkeypatch.setattr("subprocess.Popen", no_child)
    cfg = compose_app(
        "strategy=ddp_split",
        "trainer.accelerator=cpu",
        "strategy.device_ids=4",
        "strategy.devices_per_process=2",
        "strategy.chunks=4",
    )
    environ = dict(os.environ)
    trainer = build_trainer(cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    try:
        with pytest.raises(PlacementError, match=r"chunks=4 micro-batches.*3 samples \(per process\)"):
            trainer.fit(TinyNet(), datamodule=TinyData(batch_size=3))
    finally:
        os.environ.clear()
        os.environ.update(environ)
