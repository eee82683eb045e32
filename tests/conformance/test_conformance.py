"""Real architectures (``architectures.CASES``) under ``dp`` and ``model_split`` give single-device loss,
gradients and final state in float64, and their checkpoints load strictly into the bare network.

Comparable references: where BatchNorm normalises each shard on its own statistics (dp replicas,
pipeline micro-batches) or spectral norm runs a power iteration per call (micro-batches), the reference
is one device running the same shards one after another (:mod:`tests.helpers.conformance`). Under dp,
BatchNorm's running statistics are the first replica's (``nn.DataParallel``'s rule, tested in
``tests/dp/test_dp.py``), so there only loss and gradients are compared.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.checkpoint import load_state_dict_flexible
from lightning_gpupar.cli.ckpt import main as gpupar_ckpt
from tests.conformance.architectures import CASES
from tests.helpers.conformance import Case, assert_same_state, assert_same_training, fit, reference


def cases(chains_only: bool = False) -> list[Any]:
    chosen = [c for c in CASES if c.chain or not chains_only]
    return [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.slow else []) for c in chosen]


@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("case", cases())
def test_dp_equals_single_device(case: Case, replicas: int) -> None:
    sharded = "dp" in case.sharded_under
    trained = fit(case, strategy="dp", devices=replicas)
    assert_same_training(trained, reference(case, shards=replicas if sharded else 1), state=not sharded)


def split(case: Case, placement: Any, chunks: int) -> None:
    sharded = chunks > 1 and "pipeline" in case.sharded_under
    # The sharded reference updates BatchNorm's running statistics once per shard, as the pipeline does
    # without deferral; deferred BatchNorm has its own tests (tests/model_split/test_deferred_batchnorm.py).
    strategy = ModelSplitStrategy(placement=placement, chunks=chunks, deferred_batch_norm=False)
    trained = fit(case, strategy=strategy, devices=2)
    assert_same_training(trained, reference(case, shards=chunks if sharded else 1))
    assert {entry.position for entry in strategy.plan_for(trained).entries} == {0, 1}  # really split


@pytest.mark.parametrize("case", cases())
def test_model_split_with_a_placement_map_equals_single_device(case: Case) -> None:
    split(case, dict(case.placement), chunks=1)


@pytest.mark.parametrize("case", cases(chains_only=True))
def test_pipelined_model_split_with_a_placement_map_equals_single_device(case: Case) -> None:
    split(case, dict(case.placement), chunks=2)


@pytest.mark.parametrize("case", cases())  # tied weights stay together (issue 12)
def test_model_split_with_auto_placement_equals_single_device(case: Case) -> None:
    split(case, "auto", chunks=1)


@pytest.mark.parametrize("case", cases(chains_only=True))
def test_pipelined_model_split_with_auto_placement_equals_single_device(case: Case) -> None:
    split(case, "auto", chunks=2)


def bare(case: Case) -> nn.Module:
    torch.manual_seed(1)  # other weights than the trained copy started from
    return case.build().double()


@pytest.mark.parametrize("strategy", ["dp", "model_split"])
@pytest.mark.parametrize("case", cases())
def test_checkpoint_loads_strictly_into_the_bare_network(case: Case, strategy: str, tmp_path: Path) -> None:
    chosen = "dp" if strategy == "dp" else ModelSplitStrategy(placement=dict(case.placement))
    trained = fit(case, steps=1, strategy=chosen, devices=2)
    path = tmp_path / "run.ckpt"
    trained.trainer.save_checkpoint(path)
    want = trained.model.state_dict()

    loaded = bare(case)
    load_state_dict_flexible(loaded, torch.load(path, weights_only=True)["state_dict"])
    assert_same_state(loaded.state_dict(), want, rtol=0, atol=0)

    assert gpupar_ckpt(["export", str(path), str(tmp_path / "net.pt"), "--submodule", "model"]) == 0
    exported = bare(case)
    exported.load_state_dict(torch.load(tmp_path / "net.pt", weights_only=True))  # strict
    assert_same_state(exported.state_dict(), want, rtol=0, atol=0)


def test_deferred_batchnorm_keeps_the_sharded_loss_and_gradients_and_counts_steps() -> None:
    """The default pipeline (deferred BatchNorm) on a ResNet block: normalisation per micro-batch, as the
    sharded reference; running statistics updated once per step (2 steps), not once per micro-batch."""
    case = next(c for c in CASES if c.name == "resnet_block")
    trained = fit(case, strategy=ModelSplitStrategy(placement=dict(case.placement), chunks=2), devices=2)
    assert_same_training(trained, reference(case, shards=2), state=False)
    counts = {k: int(v) for k, v in trained.state_dict().items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {2}
