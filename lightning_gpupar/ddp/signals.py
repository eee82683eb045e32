"""SIGTERM for our DDP runs: every rank hears it, every rank stops after the same step, exit is bounded.

How it works: docs/internals.md, section ``lightning_gpupar/ddp/signals.py``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import threading
import time
from collections.abc import Sequence
from types import FrameType
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message
from typing_extensions import override

from lightning_gpupar.devices.requests import LAUNCHER_PID_ENV

log = logging.getLogger(__name__)

#: Seconds a rank may take, after SIGTERM, to stop at a batch boundary, save and exit; then it is ended.
#: Below the usual grace before SIGKILL (Kubernetes and SLURM: 30 s).
SIGTERM_EXIT_DEADLINE_S = 25.0
#: The training epoch loop's method that broadcasts rank 0's SIGTERM flag every step (Lightning PR #20825).
LOOP_BROADCAST = "_broadcast_sigterm_tensor"


class DDPSignalConnector(_SignalConnector):
    """Lightning's signal connector with a SIGTERM handler that is safe in a multi-process run."""

    def __init__(self, trainer: pl.Trainer) -> None:
        super().__init__(trainer)
        self.heard_sigterm = False  #: this rank received SIGTERM; the ranks agree on it in :meth:`agree`
        self._pending: _AsyncMax | None = None  #: the agreement started at the previous step

    @override
    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()
        self.heard_sigterm = False
        self._pending = None

    @override
    def _sigterm_notifier_fn(self, signum: Any, _: FrameType | None) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", self.trainer.local_rank))
        if self.heard_sigterm:
            return
        self.heard_sigterm = True
        if self.trainer.world_size <= 1:
            self.received_sigterm = True  # no rank to agree with, and Lightning's loop asks nothing then
        children = _forward(int(signum), getattr(self.trainer.strategy, "launcher", None))
        _start_deadline(SIGTERM_EXIT_DEADLINE_S, 128 + int(signum), children)

    def agree(self, device: torch.device, asynchronous: bool | None = None) -> None:
        """Called by every rank at the start of every training step, in place of Lightning's broadcast of
        rank 0's flag: set Lightning's flag on every rank once any rank has heard SIGTERM (every rank then
        stops at the end of this step).

        ``asynchronous`` (default: on CUDA) reads the all-reduce started at the previous step and starts the
        next one, so no step waits for the GPU or the other ranks; otherwise the all-reduce is read at once,
        which on CPU processes costs what Lightning's own broadcast did (an overlapping gloo collective
        measured slower)."""
        if self.received_sigterm or not dist.is_available() or not dist.is_initialized():
            return  # once set, it is set on every rank: no more collectives
        if not (device.type == "cuda" if asynchronous is None else asynchronous):
            self.received_sigterm = _AsyncMax(self.heard_sigterm, device).result()
            return
        if self._pending is not None:
            self.received_sigterm, self._pending = self._pending.result(), None
            if self.received_sigterm:
                return
        self._pending = _AsyncMax(self.heard_sigterm, device)

    def _agree_in_loop(self) -> None:
        """:meth:`agree` as the training epoch loop's per-step SIGTERM broadcast (see :func:`install`)."""
        self.agree(self.trainer.strategy.root_device)


class _AsyncMax:
    """An asynchronous all-reduce (MAX) of one flag, read later without a host sync on the GPU.

    On CUDA the result is copied to pinned host memory on a side stream that waits for the collective
    only; :meth:`result` waits for that copy's event, long done by the next step (``cudaEventSynchronize``
    is not one of the syncs ``torch.cuda.set_sync_debug_mode`` reports, and it does not wait for the
    step's own work queued since).
    """

    _side_streams: ClassVar[dict[torch.device, torch.cuda.Stream]] = {}

    def __init__(self, flag: bool, device: torch.device) -> None:
        self.value = torch.zeros(1, dtype=torch.int32, device=device)
        if flag:
            self.value.fill_(1)  # a kernel with a scalar argument: no copy from the host
        self.work = dist.all_reduce(self.value, op=dist.ReduceOp.MAX, async_op=True)
        self.host, self.copied = self.value, None
        if device.type == "cuda":
            side = self._side_streams.setdefault(device, torch.cuda.Stream(device))
            with torch.cuda.stream(side):
                self.work.wait()  # the side stream (not the step's) waits for the collective
                self.host = torch.empty(1, dtype=torch.int32, pin_memory=True)
                self.host.copy_(self.value, non_blocking=True)
                self.copied = side.record_event()

    def result(self) -> bool:
        """Whether any rank's flag was set."""
        if self.copied is None:
            self.work.wait()
        else:
            self.copied.synchronize()
        return bool(self.host[0])


def install(trainer: pl.Trainer) -> None:
    """Give ``trainer`` the connector above; call before ``Trainer._run`` registers the handlers.

    The connector's agreement takes the place of the per-step broadcast of rank 0's flag that Lightning's
    training epoch loop makes (``_broadcast_sigterm_tensor``, Lightning PR #20825): one collective per step
    instead of two. On a Lightning without it, :func:`agree` runs it from the strategy's hook."""
    if not isinstance(trainer._signal_connector, DDPSignalConnector):
        trainer._signal_connector = DDPSignalConnector(trainer)
    connector = trainer._signal_connector
    if _loop_broadcasts(trainer):
        setattr(trainer.fit_loop.epoch_loop, LOOP_BROADCAST, connector._agree_in_loop)


def agree(trainer: pl.Trainer, device: torch.device) -> None:
    """:meth:`DDPSignalConnector.agree` from the strategy's ``on_train_batch_start``, where the loop has no
    per-step broadcast for :func:`install` to replace (nothing when ``trainer`` has another connector)."""
    connector = trainer._signal_connector
    if isinstance(connector, DDPSignalConnector) and not _loop_broadcasts(trainer):
        connector.agree(device)


def _loop_broadcasts(trainer: pl.Trainer) -> bool:
    return hasattr(type(trainer.fit_loop.epoch_loop), LOOP_BROADCAST)


def _forward(signum: int, launcher: Any) -> list[subprocess.Popen]:
    """Send ``signum`` to the other local ranks: from rank 0 to its children, from a child to rank 0."""
    stop_observing = getattr(launcher, "stop_observing", None)
    children: list[subprocess.Popen] = stop_observing() if stop_observing is not None else []
    for proc in children:
        if proc.poll() is None:
            proc.send_signal(signum)
    launcher_pid = os.environ.get(LAUNCHER_PID_ENV)
    if launcher_pid and launcher_pid.isdigit() and int(launcher_pid) != os.getpid():
        with contextlib.suppress(ProcessLookupError):  # rank 0 is gone already
            os.kill(int(launcher_pid), signum)
    return children


def _start_deadline(seconds: float, exit_code: int, children: Sequence[subprocess.Popen]) -> None:
    """After ``seconds``, kill ``children`` and end this process with ``exit_code``, wherever it is."""

    def expire() -> None:
        time.sleep(seconds)
        log.error(
            "Still running %.0f s after SIGTERM (blocked in a collective or a slow save): ending the run "
            "with exit code %d.",
            seconds,
            exit_code,
        )
        for proc in children:
            if proc.poll() is None:
                proc.kill()
        logging.shutdown()
        os._exit(exit_code)

    threading.Thread(target=expire, name="gpupar-sigterm-deadline", daemon=True).start()
