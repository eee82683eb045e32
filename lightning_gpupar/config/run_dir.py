"""One run per run directory: a Hydra callback that checks and locks ``hydra.run.dir`` before a job starts.

How it works: docs/internals.md, section ``lightning_gpupar/config/run_dir.py``.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig

from lightning_gpupar.devices.requests import LAUNCHER_PID_ENV
from lightning_gpupar.errors import GpuparError

LOCK_NAME = ".run.lock"
#: Variables that give a process's rank, in the order launchers set them; any non-zero one: not rank 0.
RANK_ENV = ("RANK", "SLURM_PROCID", "NODE_RANK", "LOCAL_RANK")


class RunDirError(GpuparError, RuntimeError):
    """The run directory cannot be used: it lies under a file, or another live run holds it."""


class RunDirLock:
    """An advisory lock on a run directory, held by this process until :meth:`release` (or its exit)."""

    def __init__(self, run_dir: str | os.PathLike[str], setting: str = "hydra.run.dir") -> None:
        self.run_dir = Path(run_dir)
        self.setting = setting
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the directory and lock it; :class:`RunDirError` when another live run holds it."""
        make_run_dir(self.run_dir, self.setting)
        fd = os.open(self.run_dir / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "a process"
            os.close(fd)
            raise RunDirError(
                f"{self.setting}={str(self.run_dir)!r} is in use by another live run ({holder}). Two runs "
                "in one directory would overwrite each other's checkpoints/, logs and .hydra/. Give this "
                f"run its own directory (another {self.setting}, or leave it to Hydra's default), or wait "
                "until that run ends."
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, _describe_this_process().encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Give the directory up (the lock file stays: removing it would race with the next run's lock)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def make_run_dir(run_dir: Path, setting: str = "hydra.run.dir") -> None:
    """Create ``run_dir``; a file where a folder must be, or a folder that cannot be made, said in words."""
    blocking = next((p for p in [run_dir, *run_dir.parents] if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise RunDirError(
            f"{setting}={str(run_dir)!r}: {str(blocking)!r} is a file, not a folder, so the run directory "
            f"cannot be created. Choose another {setting}, or move that file away."
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise RunDirError(
            f"{setting}={str(run_dir)!r} cannot be created: {err.strerror or err}. Choose a folder you "
            f"can write to ({setting}=...)."
        ) from err


def another_rank_of_a_run() -> bool:
    """Whether this process is a rank other than 0 of a multi-process run (its rank 0 holds the lock)."""
    launcher = os.environ.get(LAUNCHER_PID_ENV)
    if launcher is not None and launcher != str(os.getpid()):
        return True  # started by this package's launcher, in its run directory
    if launcher == str(os.getpid()):
        return False  # the launcher itself: the rank variables it set are its children's
    for name in RANK_ENV:
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return True
    return False


class RunDirGuard(Callback):
    """Hydra callback: check and lock each job's run directory before Hydra writes into it.

    A directory it cannot use ends the program with status 1 and the reason on stderr (``SystemExit``:
    Hydra reports a callback's exceptions as warnings only).
    """

    def __init__(self) -> None:
        self._locks: list[RunDirLock] = []

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._lock(Path(str(config.hydra.run.dir)), "hydra.run.dir")

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            make_run_dir(Path(str(config.hydra.sweep.dir)), "hydra.sweep.dir")
        except RunDirError as err:
            raise SystemExit(f"Error: {err}") from None

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:  # a run's job was locked in on_run_start
            self._lock(Path(str(config.hydra.runtime.output_dir)), "hydra.sweep.dir/hydra.sweep.subdir")

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._release()

    def _lock(self, run_dir: Path, setting: str) -> None:
        if another_rank_of_a_run():
            return
        lock = RunDirLock(run_dir, setting)
        try:
            lock.acquire()
        except RunDirError as err:  # Hydra turns a callback's exceptions into warnings: exit instead
            raise SystemExit(f"Error: {err}") from None
        self._locks.append(lock)

    def _release(self) -> None:
        while self._locks:
            self._locks.pop().release()


def _describe_this_process() -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime())
    command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:300]
    return f"pid {os.getpid()} on {socket.gethostname()}, started {started}: {command}"
