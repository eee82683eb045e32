"""The GPipe pipeline: its schedule, equivalence with the unsplit model, checkpointing, stage checks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from examples.models import TransformerNet
from lightning_gpupar.model_split import PlacementError, apply_placement, plan_placement
from lightning_gpupar.model_split.pipeline import PipelineError, gpipe_schedule, install_pipeline
from tests.helpers.markers import requires_cuda

CPU2 = [torch.device("cpu"), torch.device("cpu")]
MAP = {"embed": 0, "blocks.0-1": 0, "blocks.2-3": 1, "head": 1}


def net() -> TransformerNet:
    torch.manual_seed(0)
    return TransformerNet(16, 16, 2, 4, 3, 12).double()


def test_schedule_fills_and_drains() -> None:
    ticks = gpipe_schedule(4, 2)
    assert ticks == [[(0, 0)], [(1, 0), (0, 1)], [(2, 0), (1, 1)], [(3, 0), (2, 1)], [(3, 1)]]
    idle = sum(2 - len(t) for t in ticks) / (2 * len(ticks))
    assert idle == pytest.approx((2 - 1) / (4 + 2 - 1))  # GPipe's bubble fraction (K-1)/(M+K-1)


@pytest.mark.parametrize("chunks", [1, 4, 7])
def test_pipelined_loss_and_gradients_equal_the_unsplit_model(chunks: int) -> None:
    tokens, target = torch.randint(0, 16, (10, 12)), torch.randn(10, 3, dtype=torch.float64)
    reference, split = net(), net()
    ref_loss = nn.functional.mse_loss(reference(tokens), target)
    ref_loss.backward()
    install_pipeline(split, plan_placement(split, CPU2, MAP), list(MAP), chunks)
    calls: list[int] = []
    split.head.register_forward_hook(lambda m, a, o: calls.append(len(o)))
    loss = nn.functional.mse_loss(split(tokens), target)
    loss.backward()
    micro = [10 // chunks + (i < 10 % chunks) for i in range(chunks)]  # uneven micro-batches
    assert calls == [micro[0], *micro]  # the first micro-batch also ran once through the chain check
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(reference.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=name)


def test_a_batch_smaller_than_chunks_uses_one_micro_batch_per_sample() -> None:
    model = net()
    install_pipeline(model, plan_placement(model, CPU2, MAP), list(MAP), chunks=8)
    calls: list[int] = []
    model.embed.register_forward_hook(lambda m, a, o: calls.append(len(o)))
    assert model(torch.randint(0, 16, (3, 12))).shape == (3, 3)
    assert calls == [1, 1, 1, 1]  # three micro-batches of one, the first also through the chain check


def test_checkpointed_stages_recompute_in_backward_with_the_same_gradients() -> None:
    tokens = torch.randint(0, 16, (6, 12))
    plain, recomputed = net(), net()
    for model, checkpoint in ((plain, None), (recomputed, ["blocks.2-3"])):
        install_pipeline(model, plan_placement(model, CPU2, MAP), list(MAP), 2, checkpoint)
    with torch.no_grad():
        recomputed(tokens)  # the one-time chain check runs here, before counting
    calls: list[str] = []
    recomputed.blocks[2].linear1.register_forward_hook(lambda m, a, o: calls.append("b2"))
    recomputed.blocks[0].linear1.register_forward_hook(lambda m, a, o: calls.append("b0"))
    plain(tokens).sum().backward()
    recomputed(tokens).sum().backward()
    assert calls.count("b0") == 2 and calls.count("b2") == 4  # forward, then again in backward
    for p, q in zip(plain.parameters(), recomputed.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12)


def test_removing_the_pipeline_restores_the_forward() -> None:
    model = net()
    handle = install_pipeline(model, plan_placement(model, CPU2, MAP), list(MAP), 4)
    assert "forward" in model.__dict__
    handle.remove()
    assert "forward" not in model.__dict__


@pytest.mark.parametrize(
    ("stages", "message"),
    [
        (["embed", "blocks.0-3"], r"but head holds parameters and is in no stage.*in the order its forward"),
        (["blocks.0", "blocks.1"], r"share the parent blocks \(ModuleList\), which is never called"),
        (["embed", "blocks", "head", "head"], r"appear more than once"),
    ],
)
def test_a_model_that_is_not_a_stage_sequence_is_refused(stages: list[str], message: str) -> None:
    model = net()
    plan = plan_placement(model, CPU2, MAP)
    with pytest.raises(PipelineError, match=message):
        install_pipeline(model, plan, stages, 2)


def test_sequential_stages_must_follow_its_order_and_stages_live_on_one_device() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    plan = plan_placement(model, CPU2, {"0": 0, "1": 1})
    with pytest.raises(PipelineError, match=r"nn\.Sequential: its stages are \['0', '1'\]"):
        install_pipeline(model, plan, ["1", "0"], 2)
    spread = plan_placement(model, CPU2, {"0": 0, "1.0": 0, "1.1": 1})
    with pytest.raises(PipelineError, match=r"Stage '1' is spread over positions \[0, 1\]"):
        install_pipeline(model, spread, ["0", "1"], 2)


def test_batchnorm_in_a_pipeline_warns_when_not_deferred() -> None:
    model = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4))
    plan = plan_placement(model, CPU2, {"0": 0, "1": 1})
    with pytest.warns(UserWarning, match="BatchNorm"):
        install_pipeline(model, plan, ["0", "1"], 2, deferred_batch_norm=False)


class NotAChain(nn.Module):
    """Looks like embed -> head, but transforms the value between the stages."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 4).double()
        self.head = nn.Linear(4, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.embed(x)) * 2)


class OutOfOrder(NotAChain):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(x))


@pytest.mark.parametrize(
    ("module", "stages", "problem"),
    [
        (NotAChain(), ["embed", "head"], "head does not receive embed's output unchanged"),
        (OutOfOrder(), ["head", "embed"], r"its forward calls \['embed', 'head'\]"),
    ],
)
def test_a_forward_that_is_not_the_declared_chain_is_refused(
    module: nn.Module, stages: list[str], problem: str
) -> None:
    placement = {"embed": 0, "head": 1}
    install_pipeline(module, plan_placement(module, CPU2, placement), stages, 2)
    with pytest.raises(PlacementError, match=rf"{problem}.*compute a different model"):
        module(torch.randn(4, 4, dtype=torch.float64))


class Wrapper(nn.Module):
    """Stands in for a LightningModule: the network is ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


#: The meta device stands in for a second accelerator: moving onto it makes new tensor objects.
CPU_META = [torch.device("cpu"), torch.device("meta")]


def test_a_chain_checked_pipeline_runs_when_stages_really_change_device() -> None:
    from lightning_gpupar.model_split import ModelSplit

    root = Wrapper(net())
    placement = {f"model.{key}": position for key, position in MAP.items()}
    ModelSplit(placement, chunks=2).apply(root, CPU_META, "test")
    seen: list[torch.device] = []
    root.model.head.register_forward_hook(lambda m, a, o: seen.append(o.device))
    out = root.model(torch.randint(0, 16, (5, 12)))  # the chain check, then the pipeline: no PlacementError
    assert out.is_meta and out.shape == (5, 3)
    assert root.model.embed.tokens.weight.device.type == "cpu" and root.model.head.linear.weight.is_meta
    assert seen == [torch.device("meta")] * 3  # the check's micro-batch, then two micro-batches


class NormChain(nn.Module):
    """``embed -> norm -> head`` in a hand-written forward (not an nn.Sequential): the chain is checked."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(4, 6).double()
        self.norm = nn.BatchNorm1d(6).double()
        self.head = nn.Linear(6, 2).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(x)))


def test_the_chain_check_leaves_batchnorm_running_statistics_alone() -> None:
    checked = NormChain()
    unchecked = nn.Sequential(*NormChain().children())  # the same stages, nothing to check
    x = torch.randn(8, 4, dtype=torch.float64)
    for model, placement in ((checked, {"embed": 0, "norm": 0, "head": 1}), (unchecked, {"0-1": 0, "2": 1})):
        plan = plan_placement(model, CPU2, placement)
        with pytest.warns(UserWarning, match="BatchNorm"):
            install_pipeline(model, plan, list(placement), 2, deferred_batch_norm=False)
        model(x).sum().backward()
    assert checked.norm.num_batches_tracked == unchecked[1].num_batches_tracked == 2  # one per micro-batch
    torch.testing.assert_close(checked.norm.running_mean, unchecked[1].running_mean, rtol=0, atol=0)
    torch.testing.assert_close(checked.norm.running_var, unchecked[1].running_var, rtol=0, atol=0)


TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize(
    "devices",
    [
        ("cuda:0", "cpu"),
        ("cpu", "cuda:0"),
        ("cuda:0", "cuda:0"),
        pytest.param(("cuda:0", "cuda:1"), marks=TWO_GPUS),
    ],
)
def test_pipeline_across_cuda_and_cpu_equals_the_unsplit_model(devices: tuple[str, str]) -> None:
    """Activations cross devices through the copy streams and events, in both directions."""
    tokens = torch.randint(0, 16, (10, 12))
    target = torch.randn(10, 3, dtype=torch.float64)
    reference = net()
    nn.functional.mse_loss(reference(tokens), target).backward()
    split = net()
    plan = plan_placement(split, [torch.device(d) for d in devices], MAP)
    apply_placement(split, plan)
    install_pipeline(split, plan, list(MAP), 4)
    pipeline = split.__dict__["forward"]
    compute, copy = pipeline.streams.compute_streams, pipeline.streams.copy_streams
    first_call_streams: list[dict[torch.device, torch.cuda.Stream]] = []
    for _ in range(2):  # the second call reuses the first call's streams
        split.zero_grad()
        out = split(tokens.to(plan.output_device))
        loss = nn.functional.mse_loss(out, target.to(out.device))
        loss.backward()
        first_call_streams = first_call_streams or [dict(compute), dict(copy)]
    assert pipeline.calls == 2 and out.device == plan.output_device
    assert [dict(compute), dict(copy)] == first_call_streams  # created once, kept across calls
    cuda = {torch.device(d) for d in devices if d.startswith("cuda")}
    assert set(compute) == cuda  # one compute stream per GPU ...
    crosses_devices = len(set(devices)) > 1
    assert set(copy) == (cuda if crosses_devices else set())  # ... and a copy stream where data crosses
    assert all(copy[d] != compute[d] for d in copy)
    torch.testing.assert_close(
        loss.cpu(), nn.functional.mse_loss(reference(tokens), target), rtol=1e-10, atol=1e-12
    )
    for (name, p), q in zip(reference.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-10, atol=1e-12, msg=name)
