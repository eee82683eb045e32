"""The 1F1B schedule below the strategy: its order, equivalence with the unsplit model and with GPipe
(BatchNorm, recompute), and the activations each partition holds (micro-batches and saved bytes)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from lightning_gpupar.model_split import ModelSplit, plan_placement
from lightning_gpupar.model_split.one_f_one_b import (
    StagedPipeline,
    check_schedule,
    install_staged,
    one_f_one_b_order,
)
from lightning_gpupar.model_split.pipeline import Pipeline, PipelineError, Recompute, install_pipeline
from lightning_gpupar.model_split.saved import SavedActivations

WIDTH = 16


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny float64 BatchNorm calls on a shared 2-core machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def chain(stages: int, norm: bool = False, width: int = WIDTH) -> nn.Sequential:
    """``stages`` stages, each Linear (+ BatchNorm) + Tanh, then a linear head in the last stage; float64."""
    torch.manual_seed(0)
    parts: list[nn.Module] = []
    for j in range(stages):
        layers: list[nn.Module] = [nn.Linear(6 if j == 0 else width, width)]
        layers += [nn.BatchNorm1d(width)] if norm else []
        layers += [nn.Tanh()]
        layers += [nn.Linear(width, 3)] if j == stages - 1 else []
        parts.append(nn.Sequential(*layers))
    return nn.Sequential(*parts).double()


def pipelined(
    model: nn.Sequential, chunks: int, recompute: Recompute = None, trace: str | None = None
) -> tuple[Pipeline, StagedPipeline]:
    k = len(model)
    placement = {str(j): j for j in range(k)}
    plan = plan_placement(model, [torch.device("cpu")] * k, placement)
    handle = install_pipeline(model, plan, list(placement), chunks, recompute, trace=trace)
    return handle.pipeline, install_staged(handle)


def data(n: int = 13, width: int = 6) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, width, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g).double()


def one_f_one_b(model: nn.Module, staged: StagedPipeline, x: Tensor, y: Tensor, chunks: int) -> Tensor:
    """A 1F1B step as the strategy runs it: per micro-batch the loss, weighted by its share of the batch."""
    xs, ys = x.tensor_split(chunks), y.tensor_split(chunks)
    losses: list[Tensor] = []

    def forward(m: int) -> Tensor:
        loss = nn.functional.mse_loss(model(xs[m]), ys[m]) * (len(xs[m]) / len(x))
        losses.append(loss.detach())
        return loss

    staged.run(len(xs), forward)
    return torch.stack(losses).sum()


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-10, atol=1e-12, msg=key)


def backward_steps(order: list[tuple[str, int, int]], m: int, j: int) -> int:
    return order.index(("B", m, j))


@pytest.mark.parametrize("stages", [1, 2, 3, 4])
@pytest.mark.parametrize("microbatches", [1, 2, 3, 8])
def test_the_order_backpropagates_each_micro_batch_once_and_holds_at_most_k_minus_j(
    stages: int, microbatches: int
) -> None:
    order = one_f_one_b_order(microbatches, stages)
    forwards = [m for op, m, _ in order if op == "F"]
    assert forwards == list(range(microbatches))
    backwards = sorted((m, j) for op, m, j in order if op == "B")
    assert backwards == sorted((m, j) for m in range(microbatches) for j in range(stages))
    for m in range(microbatches):
        for j in range(stages):  # after its forward, and after the partition above it
            assert order.index(("F", m, -1)) < backward_steps(order, m, j)
            if j < stages - 1:
                assert backward_steps(order, m, j + 1) < backward_steps(order, m, j)
    for j in range(stages):
        alive, peak = 0, 0
        for op, _m, i in order:
            alive += op == "F"
            alive -= op == "B" and i == j
            peak = max(peak, alive)
        assert peak == min(stages - j, microbatches)  # GPipe would hold all microbatches


def test_an_unknown_schedule_is_refused_naming_the_valid_ones() -> None:
    with pytest.raises(PipelineError, match="'gpipe', '1f1b'"):
        check_schedule("interleaved")


@pytest.mark.parametrize("stages", [2, 3])
@pytest.mark.parametrize("chunks", range(1, 9))
def test_loss_and_gradients_equal_the_unsplit_model(stages: int, chunks: int) -> None:
    x, y = data()  # 13 samples: uneven micro-batches for every chunks > 1
    reference, split = chain(stages), chain(stages)
    expected = nn.functional.mse_loss(reference(x), y)
    expected.backward()
    _, staged = pipelined(split, max(chunks, 2))
    loss = one_f_one_b(split, staged, x, y, chunks)
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-10, atol=1e-12)
    assert_same(grads(split), grads(reference))


def gpipe_and_one_f_one_b(
    norm: bool, recompute: Recompute, stages: int = 3, chunks: int = 5
) -> tuple[nn.Module, nn.Module]:
    x, y = data()
    gpipe, staged_model = chain(stages, norm), chain(stages, norm)
    pipelined(gpipe, chunks, recompute)
    _, staged = pipelined(staged_model, chunks, recompute)
    for _ in range(2):
        for model in (gpipe, staged_model):
            model.zero_grad()
        nn.functional.mse_loss(gpipe(x), y).backward()
        one_f_one_b(staged_model, staged, x, y, chunks)
    return gpipe, staged_model


@pytest.mark.parametrize(("norm", "recompute"), [(True, None), (False, "all"), (True, "all"), (True, ["1"])])
def test_with_batchnorm_and_recompute_it_equals_gpipe_exactly(norm: bool, recompute: Recompute) -> None:
    gpipe, staged_model = gpipe_and_one_f_one_b(norm, recompute)
    assert_same(grads(staged_model), grads(gpipe))
    buffers = dict(gpipe.named_buffers())
    for name, buffer in staged_model.named_buffers():  # deferred statistics: once per step, never twice
        torch.testing.assert_close(buffer, buffers[name], rtol=1e-10, atol=1e-12, msg=name)
    if norm:
        assert {int(b) for n, b in staged_model.named_buffers() if n.endswith("num_batches_tracked")} == {2}


def test_outside_a_step_the_owner_runs_gpipe() -> None:
    model = chain(2)
    pipeline, _ = pipelined(model, 4)
    x, _ = data()
    with torch.no_grad():
        out = model(x)
    assert out.shape == (13, 3) and pipeline.calls == 1


def test_calling_the_owner_twice_in_one_micro_batch_is_refused() -> None:
    model = chain(2)
    _, staged = pipelined(model, 2)
    x, _ = data()
    with pytest.raises(PipelineError, match="more than once"):
        staged.run(2, lambda m: model(x).sum() + model(x).sum())


def measure(schedule: str, stages: int, chunks: int) -> SavedActivations:
    x, y = data(64, 6)
    model = chain(stages, width=64)
    pipeline, staged = pipelined(model, chunks)
    step: Callable[[], object]
    if schedule == "gpipe":
        step = lambda: nn.functional.mse_loss(model(x), y).backward()  # noqa: E731
    else:
        step = lambda: one_f_one_b(model, staged, x, y, chunks)  # noqa: E731
    step()  # the first call runs no chain check here (nn.Sequential), but keep both alike
    with SavedActivations(pipeline) as saved:
        step()
    return saved


@pytest.mark.parametrize(("stages", "chunks"), [(2, 8), (3, 6), (2, 1)])
def test_micro_batches_alive_per_partition_gpipe_m_1f1b_k_minus_j(stages: int, chunks: int) -> None:
    gpipe, staged = measure("gpipe", stages, chunks), measure("1f1b", stages, chunks)
    assert gpipe.peak_microbatches == {j: chunks for j in range(stages)}
    assert staged.peak_microbatches == {j: min(stages - j, chunks) for j in range(stages)}


def test_stage_zero_saves_k_over_m_of_gpipes_bytes() -> None:
    stages, chunks = 2, 8
    gpipe, staged = measure("gpipe", stages, chunks), measure("1f1b", stages, chunks)
    assert staged.peak_bytes[0] <= stages / chunks * gpipe.peak_bytes[0] * 1.05
    assert staged.peak_bytes[stages - 1] <= 1 / chunks * gpipe.peak_bytes[stages - 1] * 1.05


def test_plans_count_the_micro_batches_each_schedule_holds() -> None:
    model, (x, _) = chain(2, width=64), data(64, 6)
    cpu2 = [torch.device("cpu")] * 2
    plans = {
        schedule: ModelSplit({"0": 0, "1": 1}, chunks=8, schedule=schedule).plan(model, cpu2, example_input=x)
        for schedule in ("gpipe", "1f1b")
    }
    gpipe, staged = (plans[s].memory_per_position() for s in ("gpipe", "1f1b"))
    assert gpipe[0].activations > 0 and gpipe[1].activations > 0
    for position, held in ((0, 2), (1, 1)):  # K - i of the M=8 micro-batches
        assert staged[position].activations == pytest.approx(gpipe[position].activations * held / 8, abs=1)
        assert staged[position].params == gpipe[position].params
    assert "position 0: 2, position 1: 1" in plans["1f1b"].table()
    assert "every stage holds all 8 micro-batches" in plans["gpipe"].table()


def test_the_trace_draws_one_f_one_b_with_backwards_between_forwards(tmp_path: Path) -> None:
    model, (x, y) = chain(2), data(16, 6)
    pipeline, staged = pipelined(model, 4, trace=str(tmp_path / "timeline"))
    for _ in range(4):  # one warm-up step, three recorded
        one_f_one_b(model, staged, x, y, 4)
    assert pipeline.trace is not None
    spans = [s for s in pipeline.trace.spans if s.step == 0]
    pipeline.trace.finish()
    assert (tmp_path / "timeline.json").exists()
    start = {(s.phase, s.partition, s.microbatch): s.start for s in spans}
    assert len(start) == 2 * 2 * 4  # every micro-batch's forward and backward on both partitions
    # 1F1B: the last partition's backward of micro-batch 0 runs before stage 0's forward of micro-batch 2
    assert start[("backward", 1, 0)] < start[("forward", 0, 2)]
    assert start[("backward", 0, 0)] < start[("forward", 0, 3)]
