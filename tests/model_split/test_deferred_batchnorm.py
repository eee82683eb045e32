"""Deferred BatchNorm: with chunks > 1 the running statistics equal the unsplit model's after training."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from lightning_gpupar.model_split import ModelSplit, plan_placement
from lightning_gpupar.model_split.pipeline import install_pipeline

CPU2 = [torch.device("cpu"), torch.device("cpu")]


class ConvNet(nn.Module):
    """``conv -> norm -> body -> head``, one BatchNorm. (A second BatchNorm after it would see inputs that
    were normalised per micro-batch, hence differ from the unsplit model's: its statistics would too.)"""

    def __init__(self, norm2d: type[nn.Module] = nn.BatchNorm2d, momentum: float | None = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.norm = norm2d(4, momentum=momentum)  # type: ignore[call-arg]
        self.body = nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(4 * 5 * 5, 6))
        self.head = nn.Linear(6, 3)
        self.double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.norm(self.conv(x))))


PLACEMENT = {"conv": 0, "norm": 0, "body": 1, "head": 1}


def train(model: nn.Module, batches: list[torch.Tensor]) -> None:
    """Training-mode steps, forward and backward, without updating the weights: the statistics are then a
    function of the batches alone. (An optimizer would make the weights differ: each micro-batch is
    normalised on its own statistics, so the gradients differ from the unsplit model's.)"""
    model.train()
    for x in batches:
        model(x).pow(2).mean().backward()


def norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize(("batch", "chunks"), [(12, 4), (10, 3), (7, 4)])  # even and uneven micro-batches
def test_running_statistics_equal_the_unsplit_models(batch: int, chunks: int, momentum: float | None) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, 2, 5, 5, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(3)]
    reference, split = ConvNet(momentum=momentum), ConvNet(momentum=momentum)
    train(reference, batches)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deferred by default: no BatchNorm warning
        install_pipeline(split, plan_placement(split, CPU2, PLACEMENT), list(PLACEMENT), chunks)
    train(split, batches)
    for ref, got in zip(norms(reference), norms(split), strict=True):
        assert int(got.num_batches_tracked) == int(ref.num_batches_tracked) == len(batches)
        torch.testing.assert_close(got.running_mean, ref.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(got.running_var, ref.running_var, rtol=1e-10, atol=1e-12)
    assert split.state_dict().keys() == reference.state_dict().keys()  # checkpoints keep the plain keys
    split.eval(), reference.eval()  # evaluation uses the (equal) running statistics
    torch.testing.assert_close(split(batches[0]), reference(batches[0]), rtol=1e-10, atol=1e-12)


def test_each_micro_batch_is_normalised_on_its_own_statistics() -> None:
    x = torch.randn(8, 2, 5, 5, dtype=torch.float64)
    split = ConvNet()
    install_pipeline(split, plan_placement(split, CPU2, PLACEMENT), list(PLACEMENT), 2)
    out = split(x)
    halves = ConvNet()  # the unsplit model on each half on its own
    torch.testing.assert_close(out, torch.cat([halves(x[:4]), halves(x[4:])]), rtol=1e-10, atol=1e-12)


def test_turned_off_the_statistics_update_once_per_micro_batch_with_a_warning() -> None:
    model = ConvNet()
    with pytest.warns(UserWarning, match="BatchNorm.*deferred_batch_norm"):
        handle = install_pipeline(
            model, plan_placement(model, CPU2, PLACEMENT), list(PLACEMENT), 4, deferred_batch_norm=False
        )
    model(torch.randn(8, 2, 5, 5, dtype=torch.float64))
    assert int(model.norm.num_batches_tracked) == 4
    assert handle.pipeline.batch_norms is None


def test_recomputed_stages_do_not_count_twice() -> None:
    g = torch.Generator().manual_seed(2)
    batches = [torch.randn(9, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    reference, split = ConvNet(), ConvNet()
    train(reference, batches)
    install_pipeline(split, plan_placement(split, CPU2, PLACEMENT), list(PLACEMENT), 3, recompute="all")
    train(split, batches)
    for ref, got in zip(norms(reference), norms(split), strict=True):
        assert int(got.num_batches_tracked) == 2
        torch.testing.assert_close(got.running_var, ref.running_var, rtol=1e-10, atol=1e-12)


def test_sync_batchnorm_outside_a_process_group_defers_like_batchnorm() -> None:
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(10, 2, 5, 5, generator=g, dtype=torch.float64) for _ in range(2)]
    reference = ConvNet()
    split = ConvNet(norm2d=nn.SyncBatchNorm)
    train(reference, batches)
    install_pipeline(split, plan_placement(split, CPU2, PLACEMENT), list(PLACEMENT), 4)
    train(split, batches)
    assert isinstance(split.norm, nn.SyncBatchNorm)
    torch.testing.assert_close(split.norm.running_mean, reference.norm.running_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(split.norm.running_var, reference.norm.running_var, rtol=1e-10, atol=1e-12)
    assert int(split.norm.num_batches_tracked) == 2


def test_without_running_statistics_nothing_is_deferred_or_added() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    keys = set(model.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        handle = install_pipeline(model, plan_placement(model, CPU2, {"0-1": 0, "2": 1}), ["0-1", "2"], 2)
    x = torch.randn(8, 3)
    out = model(x)
    assert handle.pipeline.batch_norms is None
    assert set(model.state_dict()) == keys and model[1].running_mean is None
    model.eval()  # without running statistics, evaluation normalises each micro-batch, as in training
    torch.testing.assert_close(model(x), out.detach())


def test_removing_the_pipeline_gives_batchnorm_its_forward_back() -> None:
    model = ConvNet()
    handle = install_pipeline(model, plan_placement(model, CPU2, PLACEMENT), list(PLACEMENT), 2)
    assert "forward" in model.norm.__dict__
    handle.remove()
    assert "forward" not in model.norm.__dict__
    model(torch.randn(4, 2, 5, 5, dtype=torch.float64))
    assert int(model.norm.num_batches_tracked) == 1


def test_model_split_option_reaches_the_pipeline() -> None:
    on = ModelSplit(PLACEMENT, chunks=2).apply(ConvNet(), CPU2, "test")
    assert on.pipeline is not None and on.pipeline.batch_norms is not None
    with pytest.warns(UserWarning, match="BatchNorm"):
        off = ModelSplit(PLACEMENT, chunks=2, deferred_batch_norm=False).apply(ConvNet(), CPU2, "test")
    assert off.pipeline is not None and off.pipeline.batch_norms is None
