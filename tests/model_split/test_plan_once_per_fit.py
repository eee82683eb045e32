"""One plan per fit: ``root_device`` before placement and ``model_to_device`` read the same plan, and the
device the run is set up on before placement is the output device placement applies (issue 23, point 3).

Two CPU devices look alike, so the device tests use ``[cpu, meta]`` (meta stands in for a second
accelerator) and an accelerator that records the device ``setup_environment`` sets up (CUDA's
``set_device``); no step runs (``limit_train_batches=0``): placement is what they decide.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import DDPSplitStrategy, ModelSplitStrategy
from lightning_gpupar.model_split import ModelSplit
from lightning_gpupar.model_split import plan as plan_module
from tests.helpers.markers import requires_cuda
from tests.helpers.programs import python, run_bounded
from tests.helpers.programs.in_process import in_process_ddp
from tests.helpers.trainer import QUIET

CPU_META = [torch.device("cpu"), torch.device("meta")]
NO_STEPS: dict[str, Any] = {**QUIET, "limit_train_batches": 0, "limit_val_batches": 0, "max_epochs": 1}


@pytest.fixture
def plans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per plan computed (each plan measures the model once, whatever the strategy or balance)."""
    computed: list[int] = []
    measure = plan_module.measure_model

    def counting(*args: Any, **kwargs: Any) -> Any:
        computed.append(1)
        return measure(*args, **kwargs)

    monkeypatch.setattr(plan_module, "measure_model", counting)
    return computed


class Chain(pl.LightningModule):
    """Three linear layers (built in ``configure_model`` when ``late``), a sample for balance='time'."""

    def __init__(self, late: bool = False) -> None:
        super().__init__()
        self.model: nn.Sequential | None = None if late else self.build()
        self.example_input_array = torch.randn(4, 8)
        self.setup_device: torch.device | None = None

    @staticmethod
    def build() -> nn.Sequential:
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build()

    def setup(self, stage: str) -> None:
        self.setup_device = self.device  # what Lightning told the module before placement

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert self.model is not None
        return self.model(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(n: int = 8) -> DataLoader:
    return DataLoader(TensorDataset(torch.randn(n, 8)), batch_size=4)


# -- how many plans a fit computes ------------------------------------------------------------------------


@pytest.mark.parametrize("balance", ["memory", "time"])
def test_model_split_plans_once_per_fit_and_again_for_the_next(plans: list[int], balance: str) -> None:
    strategy = ModelSplitStrategy("auto", chunks=2, balance=balance)
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, max_epochs=1, **QUIET)
    module = Chain()
    trainer.fit(module, data())
    assert len(plans) == 1  # before: 3 with balance="memory" (setup_environment, the setup hook, placement)
    trainer.fit(module, data())  # a second fit (nothing left to train) places, so plans, again
    assert len(plans) == 2


@pytest.mark.parametrize("balance", ["memory", "time"])
def test_ddp_split_plans_once_per_fit_in_the_launching_rank(plans: list[int], balance: str) -> None:
    kwargs = in_process_ddp(devices_per_process=2, placement="auto", chunks=2, balance=balance)
    pl.Trainer(**QUIET, max_steps=1, **kwargs).fit(Chain(), data())
    assert len(plans) == 1  # before: 6 (memory), 2 (time: the launcher's, the handed one)


def test_a_model_that_changes_before_placement_is_planned_again(plans: list[int]) -> None:
    module = Chain()
    strategy = ModelSplitStrategy("auto", parallel_devices=CPU_META)
    strategy.connect(module)
    assert strategy.root_device == strategy.root_device
    assert len(plans) == 1
    module.model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))  # e.g. configure_model replaced it
    strategy.model_to_device()
    assert len(plans) == 2
    assert strategy.applied is not None and len(strategy.applied.plan.entries) == 2


# -- the device set up before placement is the applied output device --------------------------------------


@pytest.fixture
def set_up(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    """The devices ``setup_environment`` sets up (CUDA: ``set_device``); meta is accepted as well."""
    devices: list[torch.device] = []
    monkeypatch.setattr(CPUAccelerator, "setup_device", lambda self, device: devices.append(device))
    return devices


class Applied(pl.Callback):
    """The output device of the applied plan, once placement ran; then (``release``) every tensor back on
    the CPU (uninitialised: no step runs), as the strategy's teardown cannot copy out of meta."""

    def __init__(self, release: bool = True) -> None:
        self.output: torch.device | None = None
        self.release = release

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        applied = trainer.strategy.applied  # type: ignore[attr-defined]
        self.output = applied.plan.output_device
        if self.release:
            pl_module.to_empty(device="cpu")


#: (strategy, module) cases where a plan made before placement and the one placement makes could disagree
CASES: dict[str, Callable[[], tuple[Any, Chain]]] = {
    # layers built in configure_model: before placement the last device; the map ends on position 0
    "model_split-memory-map-late": lambda: (
        ModelSplitStrategy({"model.0": 1, "model.1-2": 0}, parallel_devices=CPU_META),
        Chain(late=True),
    ),
    # time: before placement the last device; the caps leave it empty, the timed plan ends on position 0
    "model_split-time-capped": lambda: (
        ModelSplitStrategy("auto", chunks=2, balance="time", max_memory={1: 1}, parallel_devices=CPU_META),
        Chain(),
    ),
    "model_split-memory-auto": lambda: (ModelSplitStrategy("auto", parallel_devices=CPU_META), Chain()),
    "model_split-memory-auto-late": lambda: (
        ModelSplitStrategy("auto", chunks=2, parallel_devices=CPU_META),
        Chain(late=True),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_device_set_up_before_placement_is_the_applied_output_device(
    set_up: list[torch.device], case: str
) -> None:
    strategy, module = CASES[case]()
    applied = Applied()
    trainer = pl.Trainer(accelerator="cpu", strategy=strategy, callbacks=[applied], **NO_STEPS)
    trainer.fit(module, data())
    assert applied.output is not None
    assert set_up == [applied.output]
    assert module.setup_device == applied.output  # what the setup hook saw as self.device


class Placed(Exception):
    """Stops a ddp_split fit right after placement: DDP refuses a module on meta and the CPU."""


class StopAfterPlacement(DDPSplitStrategy):
    output: torch.device | None = None

    def model_to_device(self) -> None:
        super().model_to_device()
        assert self.applied is not None and self.lightning_module is not None
        self.output = self.applied.plan.output_device
        self.lightning_module.to_empty(device="cpu")
        raise Placed


@pytest.mark.parametrize("balance", ["memory", "time"])
def test_ddp_split_sets_up_the_applied_output_device(set_up: list[torch.device], balance: str) -> None:
    """One rank in this process, its group [cpu, meta]: the map ends on position 0; with balance='time' the
    caps leave position 1 empty."""
    placement: Any = {"model.0": 1, "model.1-2": 0} if balance == "memory" else "auto"
    options: dict[str, Any] = {"max_memory": {1: 1}, "chunks": 2} if balance == "time" else {}
    strategy = StopAfterPlacement(
        devices_per_process=2, placement=placement, balance=balance, parallel_devices=CPU_META, **options
    )
    module, environ = Chain(), dict(os.environ)
    try:
        trainer = pl.Trainer(**NO_STEPS, accelerator="cpu", strategy=strategy, use_distributed_sampler=False)
        with pytest.raises(Placed):
            trainer.fit(module, data())
    finally:  # what the in-process callback's teardown would do
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(environ)
    assert strategy.output is not None
    assert set_up == [strategy.output]
    assert module.setup_device == strategy.output


def test_timing_forks_the_rng_of_no_gpu_the_plan_leaves_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forking a GPU's RNG creates a CUDA context on it: timing on CPUs must fork none of the 4 GPUs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    forked: list[list[int]] = []
    fork = torch.random.fork_rng

    def recording(devices: Any = None, **kwargs: Any) -> Any:
        forked.append(list(devices or []))
        return fork(devices=[], **kwargs)

    monkeypatch.setattr(torch.random, "fork_rng", recording)
    ModelSplit("auto", chunks=2, balance="time").plan(Chain(), [torch.device("cpu")] * 2)
    assert forked and forked == [[]] * len(forked)  # before: [[0, 1, 2, 3], [0, 1, 2, 3]]


# -- on a GPU -------------------------------------------------------------------------------------------


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("balance", ["memory", "time"])
def test_cuda0_twice_sets_up_the_applied_output_device(
    monkeypatch: pytest.MonkeyPatch, plans: list[int], balance: str
) -> None:
    """[cuda:0, cuda:0]: the device set_device gets before placement, the current device in the setup
    hook and the applied output device are one; one plan; a step trains."""
    set_up: list[torch.device] = []
    setup_device = CUDAAccelerator.setup_device

    def recording(self: CUDAAccelerator, device: torch.device) -> None:
        set_up.append(device)
        setup_device(self, device)

    monkeypatch.setattr(CUDAAccelerator, "setup_device", recording)
    cuda = torch.device("cuda", 0)
    strategy = ModelSplitStrategy("auto", chunks=2, balance=balance, parallel_devices=[cuda, cuda])
    applied = Applied(release=False)
    trainer = pl.Trainer(accelerator="gpu", strategy=strategy, callbacks=[applied], max_steps=1, **QUIET)
    module = Chain()
    trainer.fit(module, data())
    assert applied.output == cuda
    assert set_up == [applied.output] and module.setup_device == applied.output
    assert len(plans) == 1
    assert module.model is not None and module.model[0].weight.device == cuda


@pytest.mark.cuda
@requires_cuda
@pytest.mark.slow
def test_no_cuda_context_before_the_plan_puts_a_stage_on_a_gpu() -> None:
    """In a fresh process: CUDA untouched before placement when the output is on the CPU and a stage on
    cuda:0; never touched by balance='time' over CPUs (it used to fork every GPU's RNG)."""
    finished = run_bounded(python("cuda_context_program.py"), timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    seen = json.loads(finished.stdout.strip().splitlines()[-1])
    assert seen["time"] == [False, False, False]
    assert seen["map"] == [False, True, True]  # [before placement, after placement, after the fit]
