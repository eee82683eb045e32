"""ddp_split: the launching process plans once and hands the plan to the ranks; ranks check they agree."""

from __future__ import annotations

import json
import os

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar.model_split import PlacementError
from lightning_gpupar.model_split.handoff import PLAN_ENV, check_same_plan, plan_from_json, plan_to_json
from lightning_gpupar.strategies.ddp_split import DDPSplitStrategy
from tests.helpers.equivalence import TinyNet

CPU4 = [torch.device("cpu")] * 4


def split_strategy(**options: object) -> DDPSplitStrategy:
    strategy = DDPSplitStrategy(devices_per_process=2, **options)
    assert isinstance(strategy, DDPSplitStrategy)
    strategy.parallel_devices = CPU4
    return strategy


def _fit_impl() -> None:
    """Stands in for the Trainer's function the launcher runs."""


def test_the_launching_process_hands_its_plan_to_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(PLAN_ENV, "stale")  # overwritten; restored (unset) after the test
    strategy = split_strategy()
    module = TinyNet()
    strategy.check_before_launch(_fit_impl, module)
    handed = json.loads(os.environ[PLAN_ENV])
    expected = strategy.split.plan(module, CPU4[:2])
    assert handed["entries"] == [[e.path, e.position, e.own_only] for e in expected.entries]
    assert handed["output"] == expected.output_position


def test_a_rank_places_by_the_handed_plan_not_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    module = TinyNet()
    own = split_strategy().split.plan(module, CPU4[:2])
    assert {e.position for e in own.entries} == {0, 1}
    handed = {"entries": [["model", 1, False]], "output": 1}  # everything on the group's second device
    monkeypatch.setenv(PLAN_ENV, json.dumps(handed))
    strategy = split_strategy()
    strategy.connect(module)
    plan = strategy.make_plan()
    assert [(e.path, e.position) for e in plan.entries] == [("model", 1)]
    assert plan.output_position == 1
    assert sum(p.params for p in plan.memory_per_position()) == sum(
        p.params for p in own.memory_per_position()
    )
    assert plan.sources["optimizer"].startswith("SGD")  # read from configure_optimizers before placement


@pytest.mark.parametrize(
    ("handed", "message"),
    [
        (
            {"entries": [["model.9", 0, False]], "output": 0},
            r"places 'model\.9', which this rank's model lacks",
        ),
        ({"entries": [["model.0", 0, False]], "output": 0}, r"leaves \['model\.2'\] .* unplaced"),
        ({"rows": []}, r"does not hold a plan"),
    ],
)
def test_a_handed_plan_that_does_not_match_the_ranks_model_is_refused(handed: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        plan_from_json(TinyNet(), CPU4[:2], json.dumps(handed))


def test_ranks_with_different_plans_fail_naming_them() -> None:
    module = TinyNet()
    plan = split_strategy().split.plan(module, CPU4[:2])
    same = plan_to_json(plan)
    check_same_plan(plan, 0, lambda mine: [mine, same])  # identical: no error
    other = plan_to_json(split_strategy(placement={"model": 0}).split.plan(module, CPU4[:2]))
    with pytest.raises(PlacementError, match=r"ranks \[1\] differ from rank 0; this is rank 0"):
        check_same_plan(plan, 0, lambda mine: [mine, other])


def test_own_tensor_entries_travel_too() -> None:
    class Owner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(3))
            self.inner = nn.Linear(3, 3)

    handed = {"entries": [["", 1, True], ["inner", 0, False]], "output": 0}
    plan = plan_from_json(Owner(), CPU4[:2], json.dumps(handed))
    assert sorted((e.path, e.own_only, e.position) for e in plan.entries) == [
        ("", True, 1),
        ("inner", False, 0),
    ]


# -- placement="device_map": the launching process reads the map once, each rank's own map must agree ------


def mapped(device_map: dict[str, int]) -> TinyNet:
    module = TinyNet()
    module.model.hf_device_map = device_map  # keys relative to self.model, as transformers writes them
    return module


MAP = {"0": 0, "1": 0, "2": 1}


def test_a_device_mapped_model_hands_its_map_down_and_each_rank_agrees(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PLAN_ENV, raising=False)
    split_strategy(placement="device_map").check_before_launch(_fit_impl, mapped(MAP))
    handed = json.loads(os.environ[PLAN_ENV])
    assert sorted((p, pos) for p, pos, _ in handed["entries"]) == [
        ("model.0", 0),
        ("model.1", 0),
        ("model.2", 1),
    ]
    for rank in (0, 1):  # every rank builds the same mapped model and reads the same plan
        strategy = split_strategy(placement="device_map")
        monkeypatch.setattr(type(strategy), "local_rank", property(lambda self, r=rank: r))
        module = mapped(MAP)
        strategy.connect(module)
        plan = strategy.make_plan()
        assert plan_to_json(plan) == os.environ[PLAN_ENV]
        assert [plan.position_of(f"model.{i}") for i in range(3)] == [0, 0, 1]


def test_a_rank_whose_own_device_map_differs_from_the_handed_plan_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PLAN_ENV, raising=False)
    split_strategy(placement="device_map").check_before_launch(_fit_impl, mapped(MAP))
    strategy = split_strategy(placement="device_map")
    strategy.connect(mapped({"0": 0, "1": 1, "2": 1}))  # this rank's model is mapped otherwise
    with pytest.raises(PlacementError, match=r"differs from the plan .* at 'model\.1': 1 here, 0 handed"):
        strategy.make_plan()


def test_a_device_map_position_outside_the_group_is_refused_before_any_process_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PLAN_ENV, raising=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=4,
        strategy=DDPSplitStrategy(devices_per_process=2, placement="device_map"),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
    )
    module = mapped({"0": 0, "1": 0, "2": 2})  # position 2: the other process's group
    with pytest.raises(
        PlacementError, match=r"entry '2': 2: on CPU devices .* there are 2 .* 2 is out of range"
    ):
        trainer.fit(module, DataLoader(TensorDataset(torch.zeros(4, 6, dtype=torch.float64)), batch_size=2))
    assert PLAN_ENV not in os.environ  # no plan was handed on: no process was started
    assert all(p.device.type == "cpu" for p in module.parameters())
