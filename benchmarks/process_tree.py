"""Run a command with a time limit and, past it, end every process it started.

Killing the command alone leaves its descendants running: pytest's DDP tests start each run in a session
of its own (so a test can kill its ranks), and those ranks would keep a GPU busy while the benchmark rows
run. :func:`run_bounded` starts the command in a new session and, on timeout, kills the process groups of
the command and of every descendant it can find (``/proc``), never its own.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Bounded:
    """How a bounded run ended: its exit status (None when it was killed at the time limit) and output."""

    returncode: int | None
    stdout: str
    stderr: str

    @property
    def timed_out(self) -> bool:
        return self.returncode is None


def run_bounded(command: Sequence[str], timeout: float, **popen: object) -> Bounded:
    """Run ``command`` (text output captured); past ``timeout`` seconds kill it and all it started."""
    proc = subprocess.Popen(
        list(command),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **popen,  # type: ignore[call-overload]
    )
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
        return Bounded(proc.returncode, stdout, stderr)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        stdout, stderr = proc.communicate()
        return Bounded(None, stdout, stderr)
    finally:
        if proc.poll() is None:
            kill_tree(proc.pid)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, its descendants, and the process groups (sessions) of all of them."""
    pids = [pid, *descendants(pid)]
    own = os.getpgrp()
    groups = set()
    for p in pids:
        with contextlib.suppress(OSError):
            groups.add(os.getpgid(p))
    for group in groups - {own}:
        with contextlib.suppress(OSError):
            os.killpg(group, signal.SIGKILL)
    for p in pids:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def descendants(pid: int) -> list[int]:
    """Every living descendant of ``pid`` (Linux ``/proc``; none found elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found
