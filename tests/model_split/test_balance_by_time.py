"""balance="time": the chain is cut where the measured stage times, not the bytes, say."""

from __future__ import annotations

import time
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.model_split import ModelSplit, PlacementError
from lightning_gpupar.model_split.balance.by_time import TimedPlan, partition_chain
from tests.helpers.trainer import QUIET

CPU2 = [torch.device("cpu"), torch.device("cpu")]


class Sleepy(nn.Linear):
    """A layer whose forward takes at least ``delay`` seconds (sleeping is slow even on a busy machine)."""

    def __init__(self, delay: float) -> None:
        super().__init__(8, 8)
        self.delay = delay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(self.delay)
        return super().forward(x)


class Chain(nn.Module):
    """Six equal-sized layers; the first is three times slower than the others."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Sequential(*(Sleepy(0.06 if i == 0 else 0.02) for i in range(6)))
        self.example_input_array = torch.randn(4, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def positions(plan: object, n: int = 6) -> list[int | None]:
    return [plan.position_of(f"model.{i}") for i in range(n)]  # type: ignore[attr-defined]


def test_a_slow_layer_moves_the_cut_and_the_stage_times_come_closer() -> None:
    by_memory = ModelSplit("auto", chunks=2).plan(Chain(), CPU2)
    by_time = ModelSplit("auto", chunks=2, balance="time").plan(Chain(), CPU2)
    assert positions(by_memory) == [0, 0, 0, 1, 1, 1]  # equal bytes: three layers each
    assert positions(by_time) != positions(by_memory)  # about 60 + 20 ms | 4 x 20 ms
    assert isinstance(by_time, TimedPlan)
    times = dict((path, seconds) for path, _, seconds in by_time.stage_times)
    per_memory_position = [
        sum(times[f"model.{i}"] for i in range(6) if positions(by_memory)[i] == p) for p in (0, 1)
    ]
    per_time_position = by_time.position_times()
    assert max(per_time_position) < max(per_memory_position)
    assert max(per_time_position) / min(per_time_position) < max(per_memory_position) / min(
        per_memory_position
    )
    table = by_time.table()
    assert "balance=time" in table and "ms" in table
    assert "expected bubble (K-1)/(M+K-1) with K=2, M=2: 33.3%" in table


def test_the_memory_caps_bound_the_time_partition() -> None:
    costs, sizes = [1.0, 1.0, 1.0, 1.0, 4.0, 1.0], [10] * 6
    assert partition_chain(costs, sizes, [float("inf")] * 2) == [0, 0, 0, 0, 1, 1]
    assert partition_chain(costs, sizes, [30, float("inf")]) == [0, 0, 0, 1, 1, 1]  # 40 bytes do not fit
    assert partition_chain([1.0] * 4, [1] * 4, [float("inf")] * 4) == [0, 1, 2, 3]
    with pytest.raises(PlacementError, match=r"cannot fit.*max_memory"):
        partition_chain(costs, sizes, [20, 20])


def test_measuring_leaves_the_model_as_it_was() -> None:
    chain = Chain()
    chain.model.append(nn.BatchNorm1d(8))
    chain.model[0].weight.grad = torch.ones(8, 8)
    before = {k: v.clone() for k, v in chain.state_dict().items()}
    ModelSplit("auto", balance="time").plan(chain, CPU2)
    for key, value in chain.state_dict().items():
        torch.testing.assert_close(value, before[key], rtol=0, atol=0, msg=key)
    assert torch.equal(chain.model[0].weight.grad, torch.ones(8, 8))
    assert chain.model[1].weight.grad is None


def test_time_balance_needs_a_sample_and_a_known_choice() -> None:
    chain = Chain()
    chain.example_input_array = None
    with pytest.raises(PlacementError, match="example_input_array"):
        ModelSplit("auto", balance="time").plan(chain, CPU2)
    with pytest.raises(PlacementError, match=r"balance='speed'.*'memory', 'time'"):
        ModelSplit("auto", balance="speed")


class Plain(pl.LightningModule):
    """Three float32 layers and a float32 sample; the precision plugin converts both for the run."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8))
        self.example_input_array = torch.randn(4, 8)
        self.seen: list[tuple[torch.dtype, bool]] = []  # (input dtype, training started) per call of model.0
        self.training_started = False
        self.model[0].register_forward_pre_hook(
            lambda m, a: self.seen.append((a[0].dtype, self.training_started))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def on_train_start(self) -> None:
        self.training_started = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self(batch[0]).float().pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(("precision", "dtype"), [("64-true", torch.float64), ("bf16-true", torch.bfloat16)])
def test_stages_are_timed_once_per_fit_in_the_runs_precision(precision: str, dtype: torch.dtype) -> None:
    module = Plain()
    strategy = ModelSplitStrategy("auto", chunks=2, balance="time")
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy=strategy, max_steps=1, precision=precision, **QUIET
    )
    trainer.fit(module, DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=4))
    planning = [d for d, started in module.seen if not started]
    assert planning == [dtype] * (1 + 1 + 3)  # one forward recording the stage inputs, warm-up, 3 repetitions
