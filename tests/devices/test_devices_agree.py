"""A strategy's own ``parallel_devices`` and the Trainer's ``devices`` must agree, or the run is refused.

The refusals are rows of tests/app/test_bad_input.py; here: what is accepted, and the GPU comparison.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_gpupar import DataParallelStrategy, ModelSplitStrategy
from lightning_gpupar.devices import DeviceSelectionError, GPUInfo
from lightning_gpupar.devices.agreement import check_strategy_devices

CPU = torch.device("cpu")


@pytest.mark.parametrize("devices", ["auto", 3, 1], ids=["auto", "same", "one-as-auto"])
@pytest.mark.parametrize("make", [DataParallelStrategy, ModelSplitStrategy])
def test_the_strategys_devices_train_when_the_trainer_agrees(devices: Any, make: Callable[..., Any]) -> None:
    from tests.helpers.equivalence import TinyNet, make_data

    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy=make(parallel_devices=[CPU] * 3),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyNet(), torch.utils.data.DataLoader(make_data(), batch_size=8))
    assert trainer.global_step == 1 and trainer.strategy.parallel_devices == [CPU] * 3


def _trainer_on_gpus(devices: Any) -> pl.Trainer:
    return pl.Trainer(accelerator="gpu", devices=devices, strategy=DataParallelStrategy(), logger=False)


@pytest.mark.parametrize(
    ("devices", "given", "refused"),
    [
        ([0, 3], [0, 3], False),
        ([0, 3], [0, 2], True),
        ([0, 3], [3, 0], True),  # another root device: another run
        (2, [0, 1], False),  # Lightning's devices=2 is GPUs 0 and 1
        (2, [0, 2], True),
        (-1, [1], False),  # every GPU, as "auto": cannot be told from the default
    ],
)
def test_gpu_requests_compare_the_devices_themselves(
    fake_gpus: Callable[..., list[GPUInfo]], devices: Any, given: list[int], refused: bool
) -> None:
    fake_gpus(80, 80, 80, 80)
    trainer = _trainer_on_gpus(devices)
    chosen = [torch.device("cuda", i) for i in given]
    if not refused:
        check_strategy_devices(trainer, "DataParallelStrategy", chosen)
        return
    with pytest.raises(DeviceSelectionError, match=r"Give the devices once") as info:
        check_strategy_devices(trainer, "DataParallelStrategy", chosen)
    assert ", ".join(map(str, chosen)) in str(info.value)
