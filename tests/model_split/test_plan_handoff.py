"""ddp_split: the launching process plans once and hands the plan to the ranks; ranks check they agree."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch import nn

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
