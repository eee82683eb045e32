"""CPU stages beside GPUs: ``strategy.device_ids=[0,1,cpu]``, the output on the CPU under
``accelerator="gpu"``, and mixed precision where each stage autocasts for its own device type.

On the CPU the mechanism is reproduced: a precision plugin autocasting another device type (``cuda``, as
Lightning's does under ``accelerator="gpu"``) leaves a CPU stage without autocast, and a stage standing in
for a GPU stage hands it bfloat16 activations; the CUDA tests run the real thing."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.config import build_trainer
from lightning_gpupar.config.checks import ConfigValueError
from lightning_gpupar.devices import DeviceSelectionError, resolve_devices
from lightning_gpupar.model_split import precision
from tests.helpers.markers import requires_cuda
from tests.helpers.trainer import TRAINING_ONLY

CPU, CUDA0, CUDA1 = torch.device("cpu"), torch.device("cuda", 0), torch.device("cuda", 1)


class HalfPrecisionStage(nn.Module):
    """Stands in for a GPU stage under Lightning's CUDA autocast: its output is bfloat16."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 8)

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.linear(x)).to(torch.bfloat16)


class TwoStages(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(HalfPrecisionStage(), nn.Linear(8, 3))
        self.dtypes: list[torch.dtype] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        out = self.model(x)
        self.dtypes.append(out.dtype)
        return nn.functional.cross_entropy(out.float(), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_train_end(self) -> None:
        self.plan_table = self.trainer.strategy.applied.plan.table()  # type: ignore[attr-defined]


def fit_under_cuda_autocast(**strategy: Any) -> tuple[TwoStages, pl.Trainer]:
    data = TensorDataset(torch.randn(16, 6), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(
        **TRAINING_ONLY,
        accelerator="cpu",
        devices=2,
        max_steps=2,
        strategy=ModelSplitStrategy(placement={"model.0": 0, "model.1": 1}, **strategy),
        plugins=[MixedPrecision("bf16-mixed", "cuda")],  # Lightning's autocast covers cuda only
    )
    module = TwoStages()
    trainer.fit(module, DataLoader(data, batch_size=8))
    return module, trainer


def test_the_failure_reproduced_a_cpu_stage_without_autocast_gets_bf16_activations() -> None:
    model = TwoStages().model
    with pytest.raises(RuntimeError, match="mat1 and mat2 must have the same dtype"):
        model(torch.randn(2, 6))


@pytest.mark.filterwarnings("ignore:.*Disabling autocast")
def test_a_cpu_stage_autocasts_for_its_own_device_type(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: True)
    module, _ = fit_under_cuda_autocast()
    assert module.dtypes == [torch.bfloat16, torch.bfloat16]
    assert "1 (cpu): bfloat16 autocast (cpu, stage's own)" in module.plan_table


@pytest.mark.filterwarnings("ignore:.*Disabling autocast")
def test_a_cpu_without_bf16_runs_its_stage_in_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(precision, "cpu_supports_bf16", lambda: False)
    module, _ = fit_under_cuda_autocast(chunks=2)
    assert module.dtypes == [torch.float32, torch.float32]
    assert "1 (cpu): float32 (this CPU has no bfloat16 support; inputs cast to float32)" in module.plan_table


def test_each_device_type_gets_lightnings_autocast_or_its_own() -> None:
    found = precision.stage_precisions([CUDA0, CUDA1, CPU], "cuda", torch.float16)
    assert [(p.device_type, p.autocast, p.own) for p in found[:2]] == [("cuda", torch.float16, False)] * 2
    expected = torch.bfloat16 if precision.cpu_supports_bf16() else None
    assert (found[2].device_type, found[2].autocast, found[2].own) == ("cpu", expected, True)


# ------------------------------------------------------------------------------ devices and the accelerator


def test_the_output_on_a_cpu_stage_sets_up_the_first_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Lightning's CUDA accelerator refuses a CPU root device ("Device should be GPU, got cpu")."""
    set_up: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", set_up.append)
    monkeypatch.setattr("lightning.pytorch.accelerators.cuda._check_cuda_matmul_precision", lambda d: None)
    strategy = ModelSplitStrategy(accelerator=CUDAAccelerator(), parallel_devices=[CUDA1, CUDA0, CPU])
    assert strategy.root_device == CPU
    strategy.setup_environment()
    assert set_up == [CUDA1]


def test_cpu_in_a_list_of_gpu_ids_is_a_stage_device(fake_gpus: Callable[..., Any]) -> None:
    fake_gpus(40, 40, 40)
    assert resolve_devices([2, "cpu", 0], "gpu").devices == (torch.device("cuda", 2), CPU, CUDA0)
    assert resolve_devices("0,1,cpu", "auto").devices == (CUDA0, CUDA1, CPU)
    assert resolve_devices([0, 1, "cpu"], "cpu").devices == (CPU, CPU, CPU)  # dry run: same positions
    with pytest.raises(DeviceSelectionError, match="'cpu' appears 2 times"):
        resolve_devices([0, "cpu", "cpu"], "gpu")
    with pytest.raises(DeviceSelectionError, match="no GPU with id 7"):
        resolve_devices([7, "cpu"], "gpu")


def test_the_app_builds_a_model_split_trainer_over_gpus_and_the_cpu(
    fake_gpus: Callable[..., Any], compose_app: Callable[..., Any]
) -> None:
    fake_gpus(40, 40)
    cfg = compose_app("strategy=model_split", "trainer.accelerator=gpu", "strategy.device_ids=[0,1,cpu]")
    trainer = build_trainer(cfg, logger=False)
    assert trainer.strategy.parallel_devices == [CUDA0, CUDA1, CPU]
    assert trainer.strategy.root_device == CPU  # the last device takes the output by default
    cfg = compose_app("strategy=dp", "trainer.accelerator=gpu", "strategy.device_ids=[0,1,cpu]")
    with pytest.raises(ConfigValueError, match="only strategy=model_split has; strategy=dp cannot use it"):
        build_trainer(cfg, logger=False)


# ------------------------------------------------------------------------------------------------ CUDA


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision_name", ["bf16-mixed", "16-mixed"])
def test_a_gpu_and_cpu_split_trains_under_mixed_precision_with_the_output_on_the_cpu(
    precision_name: str,
) -> None:
    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
            self.losses: list[float] = []

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            x, y = batch
            out = self.model(x)
            assert out.device == CPU
            loss = nn.functional.cross_entropy(out.float(), y)
            self.losses.append(loss.item())
            return loss

        def on_train_end(self) -> None:
            assert self.model[0].weight.device == CUDA0 and self.model[2].weight.device == CPU

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    strategy = ModelSplitStrategy(
        placement={"model.0": 0, "model.1": 0, "model.2": 1}, parallel_devices=[CUDA0, CPU]
    )
    trainer = pl.Trainer(
        **TRAINING_ONLY,
        accelerator="gpu",
        devices=[0],
        max_steps=3,
        precision=precision_name,
        strategy=strategy,
    )
    module = Net()
    data = TensorDataset(torch.randn(32, 6), torch.randint(0, 3, (32,)))
    trainer.fit(module, DataLoader(data, batch_size=8))
    assert len(module.losses) == 3 and all(torch.isfinite(torch.tensor(module.losses)))
    assert trainer.strategy.root_device == CPU
