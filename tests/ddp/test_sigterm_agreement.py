"""The DDP ranks' SIGTERM agreement costs no blocking sync per step on GPUs, and no collective beyond the
one Lightning's loop already makes (issue 23, point 4).

Two ranks are simulated in one process with a fake collective: each rank's all-reduce joins a round that
completes once both ranks have joined it. The guarantee (every rank stops after the same step) and the
asynchronous mechanism (the collective is read one step later) are decided here; the CUDA test decides
that no host sync happens on a GPU (one process, a one-rank NCCL group). The wiring (the agreement takes
the place of Lightning's per-step broadcast) is decided on a real Trainer; the stop with real processes
in ``tests/app/test_app_signals.py``.
"""

from __future__ import annotations

import os
import socket
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed as dist

from lightning_gpupar import DDPStrategy
from lightning_gpupar.ddp import signals
from lightning_gpupar.ddp.signals import DDPSignalConnector
from tests.helpers.markers import requires_cuda


class FakeRounds:
    """Rank r's k-th all-reduce joins round k; a round's result is the MAX of its ranks' tensors."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.rounds: list[list[torch.Tensor]] = []
        self.calls: list[dict[str, Any]] = []
        self.count = [0] * world
        self.rank = 0  # the rank now calling
        self.waits: list[tuple[int, int]] = []  # (round, step in which it was waited for)
        self.step = 0

    def all_reduce(self, tensor: torch.Tensor, op: Any = None, async_op: bool = False, **_: Any) -> Any:
        index = self.count[self.rank]
        self.count[self.rank] += 1
        if len(self.rounds) <= index:
            self.rounds.append([])
        self.rounds[index].append(tensor)
        self.calls.append({"rank": self.rank, "round": index, "async_op": async_op, "step": self.step})
        rounds = self

        class Work:
            def wait(self) -> bool:
                members = rounds.rounds[index]
                assert len(members) == rounds.world, "waited for a round another rank has not joined"
                result = torch.stack(members).amax(0)
                for member in members:
                    member.copy_(result)
                rounds.waits.append((index, rounds.step))
                return True

        if not async_op:  # a blocking all-reduce: every rank must have joined already
            Work().wait()
            return None
        return Work()


def _connectors(monkeypatch: pytest.MonkeyPatch, world: int) -> tuple[FakeRounds, list[DDPSignalConnector]]:
    rounds = FakeRounds(world)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", rounds.all_reduce)
    connectors = [DDPSignalConnector(SimpleNamespace()) for _ in range(world)]  # type: ignore[arg-type]
    return rounds, connectors


@pytest.mark.parametrize("heard_at", [0, 3])
@pytest.mark.parametrize("hearing_rank", [0, 1])
def test_every_rank_stops_after_the_same_step_and_no_step_waits_for_its_own_collective(
    monkeypatch: pytest.MonkeyPatch, heard_at: int, hearing_rank: int
) -> None:
    rounds, connectors = _connectors(monkeypatch, 2)
    stopped_at: dict[int, int] = {}
    for step in range(10):
        rounds.step = step
        # ranks run one after the other within a step: rank 0 starts step N before rank 1 does
        for rank, connector in enumerate(connectors):
            if rank == hearing_rank and step == heard_at:
                connector.heard_sigterm = True  # heard during the step, after this rank agreed
            rounds.rank = rank
            connector.agree(torch.device("cpu"), asynchronous=True)
            if connector.received_sigterm:
                stopped_at.setdefault(rank, step)
            if rank == hearing_rank and step == heard_at - 1:
                connector.heard_sigterm = True
    assert stopped_at[0] == stopped_at[1]  # together
    assert stopped_at[0] <= heard_at + 2  # soon
    assert all(call["async_op"] for call in rounds.calls)  # nothing blocks the step
    started = {c["round"]: c["step"] for c in rounds.calls}
    assert rounds.waits and all(step > started[index] for index, step in rounds.waits)  # read a step later


def test_no_collective_once_every_rank_has_stopped(monkeypatch: pytest.MonkeyPatch) -> None:
    rounds, connectors = _connectors(monkeypatch, 1)
    connectors[0].heard_sigterm = True
    for _ in range(4):
        connectors[0].agree(torch.device("cpu"), asynchronous=True)
    assert connectors[0].received_sigterm
    assert len(rounds.calls) == 1


def test_on_cpu_the_agreement_is_read_in_the_step_that_starts_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """gloo: a blocking all-reduce, as Lightning's broadcast was (an overlapping one measured slower)."""
    rounds, connectors = _connectors(monkeypatch, 1)
    connectors[0].agree(torch.device("cpu"))
    assert not connectors[0].received_sigterm
    connectors[0].heard_sigterm = True
    connectors[0].agree(torch.device("cpu"))
    assert connectors[0].received_sigterm
    assert [(index, step) for index, step in rounds.waits] == [(0, 0), (1, 0)]  # each read when started


def _trainer(monkeypatch: pytest.MonkeyPatch) -> tuple[pl.Trainer, FakeRounds]:
    """A Trainer on our DDP strategy, set up as ``fit`` would, with a fake two-rank process group."""
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(), logger=False)
    signals.install(trainer)
    rounds = FakeRounds(1)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", rounds.all_reduce)

    def lightning_broadcast(*_: Any, **__: Any) -> None:
        raise AssertionError("Lightning's per-step broadcast ran beside the agreement")

    monkeypatch.setattr(dist, "broadcast", lightning_broadcast)
    return trainer, rounds


def test_the_agreement_takes_the_place_of_lightnings_per_step_broadcast(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    trainer, rounds = _trainer(monkeypatch)
    connector = trainer._signal_connector
    assert isinstance(connector, DDPSignalConnector)
    loop = trainer.fit_loop.epoch_loop
    loop._broadcast_sigterm_tensor()  # what Lightning's advance calls at every step's start (world > 1)
    assert len(rounds.calls) == 1 and not trainer.received_sigterm
    connector.heard_sigterm = True
    loop._broadcast_sigterm_tensor()  # no SIGTERMException here: the step runs, and the loop stops after it
    assert len(rounds.calls) == 2 and trainer.received_sigterm
    signals.agree(trainer, torch.device("cpu"))  # the strategy's hook adds nothing
    assert len(rounds.calls) == 2


def test_a_lightning_without_the_per_step_broadcast_agrees_in_the_strategy_hook(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(signals, "LOOP_BROADCAST", "_no_such_method")
    trainer, rounds = _trainer(monkeypatch)
    assert "_broadcast_sigterm_tensor" not in vars(trainer.fit_loop.epoch_loop)
    signals.agree(trainer, torch.device("cpu"))
    assert len(rounds.calls) == 1


def test_one_process_stops_on_its_own_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    """World size 1: Lightning's loop asks no rank, so the signal itself sets the flag."""
    monkeypatch.setattr(signals, "_start_deadline", lambda *_: None)
    trainer = pl.Trainer(accelerator="cpu", devices=1, strategy=DDPStrategy(), logger=False)
    signals.install(trainer)
    connector = trainer._signal_connector
    assert isinstance(connector, DDPSignalConnector)
    connector._sigterm_notifier_fn(15, None)
    assert trainer.received_sigterm


@pytest.mark.cuda
@requires_cuda
def test_agreement_makes_no_host_sync_on_a_gpu() -> None:
    """A one-process NCCL group on cuda:0: steps of agreement under ``set_sync_debug_mode("error")``."""
    if not dist.is_nccl_available():
        pytest.skip("this torch has no NCCL")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1, device_id=device)
    try:
        connector = DDPSignalConnector(SimpleNamespace())  # type: ignore[arg-type]
        connector.agree(device)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for step in range(5):
                torch.cuda._sleep(1_000_000)  # the step's own work, queued
                connector.heard_sigterm = step == 2
                connector.agree(device)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert connector.received_sigterm
    finally:
        dist.destroy_process_group()
