"""GPipe defects torchgpipe's test suite found in our pipeline (issue 24), each decided through the strategy
as a user meets it: a BatchNorm stage of its own, in-place activations under ``checkpoint="all"``, an
empty stage sequence, checkpointing in eval mode and with ``chunks=1``, a module shared by two stages."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.model_split import PlacementError, plan_placement
from lightning_gpupar.model_split.pipeline import PipelineError, install_pipeline
from tests.helpers.split_user import assert_same_step, fit, reference

CPU2 = [torch.device("cpu"), torch.device("cpu")]


@pytest.mark.parametrize("checkpoint", [None, "all"])
def test_a_batchnorm_stage_of_its_own_keeps_its_deferred_statistics(checkpoint: str | None) -> None:
    torch.manual_seed(0)
    bn = nn.Sequential(nn.BatchNorm1d(4)).double()
    unsplit = copy.deepcopy(bn)
    x = torch.randn(4, 4, dtype=torch.float64) * 3 + 1
    unsplit.train()(x)
    split = fit(bn, ModelSplitStrategy({"model.0": 0}, chunks=2, checkpoint=checkpoint), devices=1, x=x)
    layer = split.model[0]
    assert int(layer.num_batches_tracked) == 1  # once per step, as unsplit: not per micro-batch or recompute
    torch.testing.assert_close(layer.running_mean, unsplit[0].running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(layer.running_var, unsplit[0].running_var, rtol=1e-10, atol=1e-12)
    assert "forward" not in layer.__dict__  # teardown gave the layer its own forward back


def relu_chain() -> nn.Sequential:
    torch.manual_seed(0)
    layers = [nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 4)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize(
    ("placement", "devices"),
    [
        ({"model.0": 0, "model.1": 0, "model.2": 1, "model.3": 1, "model.4": 1}, 2),
        ({"model.0": 0, "model.1": 1, "model.2": 1, "model.3": 1, "model.4": 1}, 2),  # ReLU after the cut
        ({f"model.{i}": 0 for i in range(5)}, 1),
        ("auto", 2),
    ],
)
def test_in_place_activations_train_under_checkpoint_all(placement: Any, devices: int) -> None:
    model, x = relu_chain(), torch.randn(4, 4, dtype=torch.float64)
    loss, grads = reference(model, x)
    split = fit(model, ModelSplitStrategy(placement, chunks=2, checkpoint="all"), devices=devices, x=x)
    assert_same_step(split, loss, grads)


def vgg_like() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(16, 8),
        nn.ReLU(inplace=True),
        nn.Linear(8, 3),
    ).double()


def test_a_vgg_like_model_trains_with_auto_placement_and_checkpoint_all() -> None:
    model, x = vgg_like(), torch.randn(4, 2, 4, 4, dtype=torch.float64)
    loss, grads = reference(model, x)
    split = fit(model, ModelSplitStrategy("auto", chunks=2, checkpoint="all"), x=x, example=x)
    assert_same_step(split, loss, grads)


def test_checkpoint_all_recomputes_each_partition_once_per_micro_batch() -> None:
    model = relu_chain()
    install_pipeline(
        model, plan_placement(model, CPU2, {"0": 0}, default_device=1), ["0", "1", "2", "3", "4"], 2, "all"
    )
    calls: list[int] = []
    model[2].register_forward_hook(lambda m, a, o: calls.append(len(o)))
    model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
    assert calls == [2, 2, 2, 2]  # two micro-batches, each forward and once more in backward


@pytest.mark.parametrize(
    "options",
    [{"placement": {}}, {"placement": {}, "default_device": 0}, {"placement": {"model.0": 0}, "stages": []}],
)
def test_a_pipeline_without_stages_is_refused_before_training(options: dict[str, Any]) -> None:
    with pytest.raises(PlacementError, match=r"chunks=2 pipelines a sequence of stages, but .* none"):
        ModelSplitStrategy(chunks=2, **options)


def test_install_pipeline_refuses_an_empty_stage_sequence() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = nn.Sequential()

        def forward(self, x: Tensor) -> Tensor:
            return self.model(x)

    for model in (nn.Sequential(), Holder()):
        with pytest.raises(PipelineError, match=r"no stages.*name the stages"):
            install_pipeline(model, plan_placement(model, CPU2[:1], {}), [], 2)


def test_checkpointing_is_off_in_eval_mode_with_gradients_on() -> None:
    model = relu_chain()
    install_pipeline(
        model, plan_placement(model, CPU2, {"0": 0}, default_device=1), [str(i) for i in range(5)], 2, "all"
    )
    with torch.no_grad():
        model(torch.randn(4, 4, dtype=torch.float64))  # the one-time chain check
    calls: list[int] = []
    model[0].register_forward_hook(lambda m, a, o: calls.append(len(o)))
    model.eval()
    model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
    assert calls == [2, 2]  # no recomputation in backward
    model.train()
    model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
    assert calls == [2, 2, 2, 2, 2, 2]


def test_with_chunks_1_checkpoint_is_validated_and_warns_that_it_does_nothing() -> None:
    with pytest.raises(PipelineError, match=r"checkpoint names \['model.nope'\], which are not stages"):
        fit(relu_chain(), ModelSplitStrategy({"model": 0}, chunks=1, checkpoint="model.nope"), devices=1)
    with pytest.warns(UserWarning, match=r"checkpoint='all'.*chunks=1 runs no pipeline"):
        fit(relu_chain(), ModelSplitStrategy({"model": 0}, chunks=1, checkpoint="all"), devices=1)


def test_tensors_of_different_batch_sizes_are_refused_naming_the_pipeline() -> None:
    class Pair(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, pair: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
            return self.a(pair[0]), self.b(pair[1])

    model = nn.Sequential(Pair())
    install_pipeline(model, plan_placement(model, CPU2, {"0": 0}), ["0"], 2)
    with pytest.raises(PipelineError, match=r"chunks=2.*micro-batches.*\[3, 4\].*docs/pipeline.md"):
        model((torch.randn(4, 4), torch.randn(3, 4)))


@pytest.mark.parametrize("placement", ["auto", {"model.0": 0, "model.1": 0}])
def test_a_module_shared_by_two_stages_trains_on_one_device(placement: Any) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 2, 1).double()
    model, x = nn.Sequential(conv, conv), torch.randn(4, 2, 3, 3, dtype=torch.float64)
    loss, grads = reference(model, x)
    split = fit(model, ModelSplitStrategy(placement, chunks=2), devices=1, x=x, example=x)
    assert_same_step(split, loss, grads)


def test_a_module_shared_by_stages_on_two_devices_is_refused_naming_it() -> None:
    conv = nn.Conv2d(2, 2, 1).double()
    with pytest.raises(PlacementError, match=r"same \(tied\) parameter.*place model.1 on position 0"):
        fit(nn.Sequential(conv, conv), ModelSplitStrategy({"model.0": 0, "model.1": 1}, chunks=2))


def test_the_planner_leaves_a_shared_module_as_it_was() -> None:
    conv = nn.Conv2d(2, 2, 1)
    model = nn.Sequential(conv, conv)
    plan_placement(model, CPU2, "auto", example_input=torch.randn(2, 2, 3, 3))
    assert all(p.device.type == "cpu" for p in model.parameters())  # not left on the meta device


def test_no_warning_from_a_plain_pipeline() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = relu_chain()
        install_pipeline(
            model, plan_placement(model, CPU2, {"0": 0}, default_device=1), [str(i) for i in range(5)], 2
        )
        model(torch.randn(4, 4, dtype=torch.float64)).sum().backward()
