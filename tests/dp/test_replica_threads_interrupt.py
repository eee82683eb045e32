"""Ctrl-C while dp replicas run: the interrupt reaches the caller only after every replica thread ended.

Unwinding the main thread (Lightning's graceful shutdown, then interpreter exit) while replica threads
still ran torch ops aborted the process in some trials (``terminate called without an active exception``).
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from lightning_gpupar.dp.parallel_apply import run_parallel


@pytest.fixture(autouse=True)
def python_handles_ctrl_c() -> Iterator[None]:
    """``interrupt_main`` does nothing where SIGINT is ignored (a test run started as a background job)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("interrupts", [1, 3])
def test_ctrl_c_waits_for_every_replica_thread(interrupts: int) -> None:
    finished = [threading.Event(), threading.Event()]

    def replica(i: int) -> torch.Tensor:
        if i == 0:
            for _ in range(interrupts):  # Ctrl-C, pressed `interrupts` times, while replica 1 still works
                _thread.interrupt_main()
                time.sleep(0.05)
        time.sleep(0.3)
        finished[i].set()
        return torch.ones(1)

    with pytest.raises(KeyboardInterrupt):
        run_parallel([lambda: replica(0), lambda: replica(1)], [torch.device("cpu")] * 2)
    assert all(event.is_set() for event in finished)
    assert not [t for t in threading.enumerate() if t.name.startswith("gpupar-replica-")]
