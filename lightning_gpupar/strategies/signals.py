"""SIGTERM for our DDP runs: every rank hears it, no collective runs inside the handler, exit is bounded.

Lightning's handler (``_SignalConnector._sigterm_notifier_fn``) sends the signal on to the launcher's
children and then calls ``dist.broadcast`` inside the signal handler. The handler runs between two
bytecodes of the main thread, wherever training is, so that broadcast can pair with another rank's
gradient all-reduce or with its own handler's broadcast: the ranks then wait for each other until the
process group's timeout (30 minutes by default). A SIGTERM that reaches a child rank only is never seen by
rank 0, which keeps training.

The connector here keeps Lightning's flag (``trainer.received_sigterm``), which the loops check after each
batch and at each batch start (a broadcast of rank 0's flag, outside the handler), and changes the
handler: it runs no collective, forwards the signal once (rank 0 to its children, a child to the process
that launched it), takes rank 0's children out of Lightning's process observer (which would SIGKILL rank 0
when a child exits non-zero, cutting short its checkpoint), and starts a deadline: a rank still running
``SIGTERM_EXIT_DEADLINE_S`` seconds later kills its children and exits with 128 + the signal number.
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
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.rank_zero import rank_prefixed_message

from lightning_gpupar.devices import LAUNCHER_PID_ENV

log = logging.getLogger(__name__)

#: Seconds a rank may take, after SIGTERM, to stop at a batch boundary, save and exit; then it is ended.
#: Below the usual grace before SIGKILL (Kubernetes and SLURM: 30 s).
SIGTERM_EXIT_DEADLINE_S = 25.0


class DDPSignalConnector(_SignalConnector):
    """Lightning's signal connector with a SIGTERM handler that is safe in a multi-process run."""

    def _sigterm_notifier_fn(self, signum: Any, _: FrameType | None) -> None:
        log.info(rank_prefixed_message(f"Received SIGTERM: {signum}", self.trainer.local_rank))
        if self.received_sigterm:
            return
        self.received_sigterm = True
        children = _forward(int(signum), getattr(self.trainer.strategy, "launcher", None))
        _start_deadline(SIGTERM_EXIT_DEADLINE_S, 128 + int(signum), children)


def install(trainer: pl.Trainer) -> None:
    """Give ``trainer`` the connector above; call before ``Trainer._run`` registers the handlers."""
    if not isinstance(trainer._signal_connector, DDPSignalConnector):
        trainer._signal_connector = DDPSignalConnector(trainer)


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
