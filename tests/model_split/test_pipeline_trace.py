"""trace=PATH: the schedule of a few pipeline steps as a Chrome trace, a PNG timeline and printed numbers."""

from __future__ import annotations

import builtins
import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from lightning_gpupar.model_split import ModelSplit

CPU2 = [torch.device("cpu"), torch.device("cpu")]
PLACEMENT = {"0-1": 0, "2-3": 1}


def model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Linear(32, 2))


def train(module: nn.Module, calls: int) -> None:
    x = torch.randn(16, 8)
    for _ in range(calls):
        module(x).sum().backward()
    with torch.no_grad():  # evaluation calls are never recorded
        module(x)


def test_the_trace_records_each_micro_batch_forward_and_backward(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    net = model()
    applied = ModelSplit(PLACEMENT, chunks=4, trace=str(tmp_path / "out" / "schedule")).apply(net, CPU2, "t")
    trace = applied.pipeline.trace  # type: ignore[union-attr]
    assert trace is not None
    train(net, 1 + 3)  # one warm-up call, three recorded
    with caplog.at_level(logging.INFO):
        train(net, 1)  # the call after the recorded ones writes the results
    spans = trace.spans
    assert {(s.step, s.phase, s.partition, s.microbatch) for s in spans} == {
        (step, phase, p, i)
        for step in range(3)
        for phase in ("forward", "backward")
        for p in (0, 1)
        for i in range(4)
    }
    for s in spans:
        assert s.end >= s.start > 0
    first = {(s.phase, s.partition, s.microbatch): s for s in spans if s.step == 0}
    for i in range(4):  # GPipe order: p0 before p1 forward, p1 before p0 backward, backward after forward
        assert first["forward", 0, i].end <= first["forward", 1, i].start
        assert first["backward", 1, i].end <= first["backward", 0, i].start + 1e-4
        assert first["forward", 1, 3].end <= first["backward", 1, i].start
    events = json.loads((tmp_path / "out" / "schedule.json").read_text())["traceEvents"]
    labels = {e["name"] for e in events if str(e.get("name", "")).startswith("pipeline forward")}
    assert labels == {f"pipeline forward p{p} mb{i}" for p in (0, 1) for i in range(4)}  # record_function
    boxes = [e for e in events if e.get("pid") == "pipeline schedule" and e.get("ph") == "X"]
    assert len(boxes) == len(spans) and {e["name"] for e in boxes} >= {"F0", "B3"}
    assert "measured bubble fraction" in caplog.text and "partition 1 (cpu): busy" in caplog.text
    pytest.importorskip("matplotlib")
    png = tmp_path / "out" / "schedule.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"pipeline timeline: {png}" in caplog.text


def test_without_matplotlib_the_trace_is_written_and_the_message_says_how_to_get_the_picture(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    net = model()
    applied = ModelSplit(PLACEMENT, chunks=2, trace=str(tmp_path / "t")).apply(net, CPU2, "t")
    train(net, 2)
    with caplog.at_level(logging.INFO):
        applied.remove()  # teardown writes what was recorded so far
    assert (tmp_path / "t.json").exists() and not (tmp_path / "t.png").exists()
    assert "pip install 'lightning-gpupar[plot]'" in caplog.text


def test_tracing_is_off_by_default() -> None:
    applied = ModelSplit(PLACEMENT, chunks=2).apply(model(), CPU2, "t")
    assert applied.pipeline is not None and applied.pipeline.trace is None


def test_a_trace_without_a_pipeline_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"chunks=1 runs no pipeline: nothing is traced"):
        ModelSplit(PLACEMENT, chunks=1, trace=str(tmp_path / "t")).apply(model(), CPU2, "t")


def test_only_the_first_process_traces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 1)  # as in a ddp_split process of rank 1
    applied = ModelSplit(PLACEMENT, chunks=2, trace=str(tmp_path / "t")).apply(model(), CPU2, "t")
    assert applied.pipeline is not None and applied.pipeline.trace is None


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_spans_are_gpu_time_not_enqueue_time(tmp_path: Path) -> None:
    """Issue 23 point 8: a stage that keeps the GPU busy ~10 ms (``torch.cuda._sleep``) but is queued in
    microseconds: its forward spans last that long, so the bubble fraction comes from GPU time."""
    gpu = torch.device("cuda", 0)
    net = model()
    net[0].register_forward_pre_hook(lambda module, args: torch.cuda._sleep(20_000_000))
    applied = ModelSplit(PLACEMENT, chunks=2, trace=str(tmp_path / "schedule")).apply(net, [gpu, gpu], "t")
    trace = applied.pipeline.trace  # type: ignore[union-attr]
    assert trace is not None
    x = torch.randn(16, 8, device=gpu)
    for _ in range(1 + 3 + 1):
        net(x).sum().backward()
    slow = [s for s in trace.spans if s.phase == "forward" and s.partition == 0]
    fast = [s for s in trace.spans if s.phase == "forward" and s.partition == 1]
    assert slow and all(s.end - s.start > 2e-3 for s in slow)  # the sleep, on the GPU
    assert all(s.end - s.start < min(x.end - x.start for x in slow) for s in fast)
    for s in trace.spans:
        assert s.end >= s.start > 0 and s.events is None
