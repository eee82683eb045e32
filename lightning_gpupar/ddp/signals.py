"""SIGTERM for our DDP runs: every rank hears it, every rank stops after the same step, exit is bounded.

Lightning's handler (``_SignalConnector._sigterm_notifier_fn``) sends the signal on to the launcher's
children and then calls ``dist.broadcast`` inside the signal handler. The handler runs between two
bytecodes of the main thread, wherever training is, so that broadcast can pair with another rank's
gradient all-reduce or with its own handler's broadcast: the ranks then wait for each other until the
process group's timeout (30 minutes by default). A SIGTERM that reaches a child rank only is never seen by
rank 0, which keeps training. And Lightning's loops raise their SIGTERM exception at the end of a step on
each rank that has its flag (``trainer.received_sigterm``) set: a rank that heard the signal later than
another has left that check behind and meets the stopped rank in the next step's collectives, where it
fails with "Connection closed by peer" instead of stopping.

The connector here changes the handler: it runs no collective; it notes the signal (``heard_sigterm``),
forwards it once (rank 0 to its children, a child to the process that launched it), takes rank 0's
children out of Lightning's process observer (which would SIGKILL rank 0 when a child exits non-zero,
cutting short its checkpoint), and starts a deadline: a rank still running ``SIGTERM_EXIT_DEADLINE_S``
seconds later kills its children and exits with 128 + the signal number. Lightning's flag is set only by
:meth:`DDPSignalConnector.agree`, which every rank calls at the start of every training step (a one-number
all-reduce): once any rank has heard the signal, every rank sets the flag in the same step, so every rank
stops at that step's end, together.
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
from typing import Any

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


class DDPSignalConnector(_SignalConnector):
    """Lightning's signal connector with a SIGTERM handler that is safe in a multi-process run."""

    def __init__(self, trainer: pl.Trainer) -> None:
        super().__init__(trainer)
        self.heard_sigterm = False  #: this rank received SIGTERM; the ranks agree on it in :meth:`agree`

    @override
    def register_signal_handlers(self) -> None:
        super().register_signal_handlers()
        self.heard_sigterm = False

    @override
    def _sigterm_notifier_fn(self, signum: Any, _: FrameType | None) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", self.trainer.local_rank))
        if self.heard_sigterm:
            return
        self.heard_sigterm = True
        children = _forward(int(signum), getattr(self.trainer.strategy, "launcher", None))
        _start_deadline(SIGTERM_EXIT_DEADLINE_S, 128 + int(signum), children)

    def agree(self, device: torch.device) -> None:
        """Called by every rank at the start of every training step: Lightning's flag is set on every rank
        when any rank has heard SIGTERM, so every rank stops at the end of this step."""
        if self.received_sigterm or not dist.is_available() or not dist.is_initialized():
            return  # once set, it is set on every rank: no more collectives
        heard = torch.tensor([int(self.heard_sigterm)], device=device)
        dist.all_reduce(heard, op=dist.ReduceOp.MAX)
        self.received_sigterm = bool(heard.item())


def install(trainer: pl.Trainer) -> None:
    """Give ``trainer`` the connector above; call before ``Trainer._run`` registers the handlers."""
    if not isinstance(trainer._signal_connector, DDPSignalConnector):
        trainer._signal_connector = DDPSignalConnector(trainer)


def agree(trainer: pl.Trainer, device: torch.device) -> None:
    """:meth:`DDPSignalConnector.agree` for ``trainer`` (nothing when it has another connector)."""
    connector = trainer._signal_connector
    if isinstance(connector, DDPSignalConnector):
        connector.agree(device)


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
