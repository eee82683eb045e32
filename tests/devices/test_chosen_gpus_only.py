"""Every strategy makes its first CUDA call on a chosen GPU: a run on [2, 3] leaves GPUs 0 and 1 untouched.

``torch.cuda`` is mocked to record which devices get a CUDA context (``cuda_contexts``); NVML is fake.
"""

from __future__ import annotations

from typing import Any

import lightning.fabric.utilities.distributed
import pytest
import torch
from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch import LightningModule
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.strategies import Strategy
from torch import nn

from lightning_gpupar import DataParallelStrategy, DDPSplitStrategy, DDPStrategy, ModelSplitStrategy
from lightning_gpupar.devices import resolve_devices
from lightning_gpupar.strategies import ddp_split as ddp_module  # where the split overrides live
from tests.helpers.nvml_support import FakeNVML, cuda_contexts, fake_nvml, gpu

__all__ = ["cuda_contexts", "fake_nvml"]  # fixtures

CHOSEN = [torch.device("cuda", 2), torch.device("cuda", 3)]
#: The output lands on position 0 (``net.1`` runs last), not on the last device.
PLACEMENT = {"net.0": 1, "net.1": 0}


class TwoLayers(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))


def _strategies() -> dict[str, Strategy]:
    return {
        "dp": DataParallelStrategy(accelerator=CUDAAccelerator(), parallel_devices=list(CHOSEN)),
        "model_split": ModelSplitStrategy(
            placement=PLACEMENT, accelerator=CUDAAccelerator(), parallel_devices=list(CHOSEN)
        ),
        "ddp_split": DDPSplitStrategy(
            devices_per_process=2,
            placement=PLACEMENT,
            accelerator=CUDAAccelerator(),
            parallel_devices=list(CHOSEN),
            cluster_environment=LightningEnvironment(),
        ),
    }


@pytest.fixture
def process_group(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """``init_process_group`` calls, recorded instead of made."""
    calls: list[dict[str, Any]] = []
    record = lambda env, backend, **kw: calls.append({"backend": backend, **kw})  # noqa: E731
    monkeypatch.setattr(ddp_module, "_init_dist_connection", record, raising=False)
    monkeypatch.setattr(lightning.pytorch.strategies.ddp, "_init_dist_connection", record)
    monkeypatch.setattr(lightning.fabric.utilities.distributed, "_init_dist_connection", record)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    return calls


@pytest.mark.parametrize("name", ["dp", "model_split", "ddp_split"])
def test_setup_touches_only_the_chosen_gpus_and_first_the_output_device(
    name: str, fake_nvml: FakeNVML, cuda_contexts: list[int], process_group: list[dict[str, Any]]
) -> None:
    fake_nvml(*(gpu(i, 40) for i in range(4)))
    assert resolve_devices([2, 3], "gpu").trainer_devices == [2, 3]
    assert resolve_devices("auto:2", "gpu").trainer_devices == [0, 1]  # NVML: no context on any of them
    assert cuda_contexts == []
    strategy = _strategies()[name]
    strategy.connect(TwoLayers())
    strategy.setup_environment()
    assert cuda_contexts, "setup_environment made no CUDA call: the test checks nothing"
    assert set(cuda_contexts) <= {2, 3}
    assert cuda_contexts[0] == 2  # dp: the first device; the splits: the plan's output device
    assert strategy.root_device == torch.device("cuda", 2)


@pytest.mark.parametrize("name", ["model_split", "ddp_split"])
def test_init_module_builds_a_split_model_on_the_cpu(name: str, fake_nvml: FakeNVML) -> None:
    """Trainer.init_module / configure_model use the strategy's tensor_init_context: on root_device the
    whole model would land on one GPU, the OOM splitting exists to avoid."""
    fake_nvml(*(gpu(i, 40) for i in range(4)))
    strategy = _strategies()[name]
    with strategy.tensor_init_context():
        layer = nn.Linear(2, 2)
    assert layer.weight.device == torch.device("cpu")


def test_ddp_split_creates_an_unbound_process_group(
    fake_nvml: FakeNVML, cuda_contexts: list[int], process_group: list[dict[str, Any]]
) -> None:
    """NCCL bound to one device refuses collectives on the group's other devices (suspicion 1)."""
    fake_nvml(*(gpu(i, 40) for i in range(4)))
    split = _strategies()["ddp_split"]
    split.connect(TwoLayers())
    split.setup_environment()
    plain = DDPStrategy(
        accelerator=CUDAAccelerator(),
        parallel_devices=[CHOSEN[1]],
        cluster_environment=LightningEnvironment(),
    )
    plain.connect(TwoLayers())
    plain.setup_environment()
    assert [call.get("device_id") for call in process_group] == [None, torch.device("cuda", 3)]
    assert [call["backend"] for call in process_group] == ["nccl", "nccl"]


def test_ddp_split_barrier_names_the_output_device_under_nccl(
    fake_nvml: FakeNVML, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_nvml(*(gpu(i, 40) for i in range(4)))
    barriers: list[Any] = []
    monkeypatch.setattr(ddp_module, "_distributed_is_initialized", lambda: True, raising=False)
    monkeypatch.setattr(lightning.pytorch.strategies.ddp, "_distributed_is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_backend", lambda group=None: "nccl")
    monkeypatch.setattr(torch.distributed, "barrier", lambda **kw: barriers.append(kw.get("device_ids")))
    split = _strategies()["ddp_split"]
    split.connect(TwoLayers())
    split.barrier()
    assert barriers == [[2]]
