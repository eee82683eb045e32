"""Small programs the DDP tests start as separate processes, and a runner that cannot hang.

A DDP program re-executes itself for every extra rank, so it must be a real script, not pytest.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PROGRAMS = Path(__file__).resolve().parent
ROOT = PROGRAMS.parents[2]


@dataclass
class Finished:
    """How a program ended: exit code, output, seconds it took, and its session (process group) id."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float
    pgid: int


def run_bounded(
    cmd: list[str], timeout: float, cwd: Path | None = None, env: dict[str, str] | None = None
) -> Finished:
    """Run ``cmd`` in its own session; on timeout kill the whole session (every rank) and fail."""
    start = time.monotonic()
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for key in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK"):  # never inherit a DDP layout
        if env is None or key not in env:
            full_env.pop(key, None)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"{cmd} ran past {timeout}s and was killed.\n{stderr[-3000:]}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return Finished(proc.returncode, stdout, stderr, time.monotonic() - start, proc.pid)


def python(program: str, *args: str) -> list[str]:
    """The command that runs ``tests/ddp_programs/<program>`` with this interpreter."""
    return [sys.executable, str(PROGRAMS / program), *args]


@contextmanager
def preserved_environ() -> Iterator[None]:
    """Undo every change to ``os.environ`` (Lightning's cluster environments write MASTER_ADDR/PORT)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
