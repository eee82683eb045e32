"""Replica threads run on the caller's CUDA stream of their device, as in torch's ``parallel_apply``
(suspicion 5): in a new thread the current stream is the default one."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch

from lightning_gpupar.dp.parallel_apply import run_parallel
from tests.helpers.markers import requires_cuda


def test_each_replica_thread_enters_the_callers_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mocked torch.cuda: the current stream is per thread, the caller's is a side stream."""
    caller = threading.current_thread()
    current: dict[int, str] = {}  # thread id -> stream entered in it

    def current_stream(device: Any = None) -> str:
        index = torch.device(device).index
        here = threading.current_thread()
        return current.get(threading.get_ident(), f"side{index}" if here is caller else f"default{index}")

    @contextmanager
    def stream(s: str) -> Iterator[None]:
        current[threading.get_ident()] = s
        yield

    @contextmanager
    def device(d: Any) -> Iterator[None]:
        yield

    monkeypatch.setattr(torch.cuda, "current_stream", current_stream)
    monkeypatch.setattr(torch.cuda, "stream", stream)
    monkeypatch.setattr(torch.cuda, "device", device)
    devices = [torch.device("cuda", 0), torch.device("cuda", 1)]
    seen = run_parallel([lambda i=i: current_stream(devices[i]) for i in range(2)], devices)  # type: ignore[misc]
    assert seen == ["side0", "side1"]


@pytest.mark.cuda
@requires_cuda
def test_a_shard_written_on_a_side_stream_is_read_after_the_write() -> None:
    """Under ``torch.cuda.stream(s)``, a slow write on ``s`` then a replica reading it: on the default
    stream the read would not wait (seen as zeros); on the caller's stream it does."""
    device = torch.device("cuda", 0)
    side = torch.cuda.Stream(device)
    with torch.cuda.stream(side):
        x = torch.zeros(1 << 20, device=device)
        torch.cuda._sleep(50_000_000)  # keeps the side stream busy before the write
        x.fill_(1.0)
        sums = run_parallel([lambda: float(x.sum()), lambda: float(x.sum())], [device, device])
    assert sums == [float(1 << 20)] * 2
    assert torch.cuda.current_stream(device) == torch.cuda.default_stream(device)
