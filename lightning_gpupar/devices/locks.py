"""One advisory lock per GPU, so that runs started together with ``device_ids=auto`` never share a GPU.

A run that chooses GPUs by free memory takes each chosen GPU's lock: ``fcntl.flock`` on a file named
after the GPU's UUID in a directory every user can write (``/tmp/lightning_gpupar-locks``, or
``$LIGHTNING_GPUPAR_LOCK_DIR``). Another ``auto`` run skips GPUs whose lock it cannot take. A lock is
held until the process exits or chooses again, and the OS releases it when its holder dies, however it
dies: a stale file never blocks a GPU. The file holds the holder's pid and command, for ``gpupar-devices``.

The locks are advisory: they order our own ``auto`` runs, not other programs, and a run that names its
GPUs (``device_ids=[0,3]``) takes none.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

#: Overrides the directory of the lock files (all runs that should coordinate must agree on it).
LOCK_DIR_ENV = "LIGHTNING_GPUPAR_LOCK_DIR"

#: This process's locks: lock file -> (GPU UUID, the open file descriptor that holds the lock).
_held: dict[Path, tuple[str, int]] = {}


def lock_dir() -> Path:
    """The directory of the lock files, created (sticky, writable by every user, like /tmp) if missing."""
    path = Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "lightning_gpupar-locks")
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # someone else's directory: use it as it is
            path.chmod(0o1777)
    return path


def lock_path(uuid: str) -> Path:
    return lock_dir() / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', uuid)}.lock"


def try_lock(uuid: str) -> bool:
    """Take GPU ``uuid``'s lock for this process; ``False`` when another process holds it."""
    path = lock_path(uuid)
    if path in _held:
        return True
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:  # another user's file: flock works on a read-only descriptor too
        fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)  # the next holder may be another user
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {' '.join(sys.argv)[:200]}\n".encode())
    _held[path] = (uuid, fd)
    return True


def release(uuids: Iterable[str]) -> None:
    """Release this process's locks on ``uuids`` (those it does not hold are ignored)."""
    for uuid in list(uuids):
        held = _held.pop(lock_path(uuid), None)
        if held is not None:
            os.close(held[1])  # closing the only descriptor releases the flock


def held_here() -> set[str]:
    """The UUIDs of the GPUs this process holds (in the current lock directory)."""
    directory = lock_dir()
    return {uuid for path, (uuid, _) in _held.items() if path.parent == directory}


def holder(uuid: str) -> str | None:
    """Who holds GPU ``uuid``'s lock (``"pid 123: python train.py ..."``), or ``None`` when nobody does."""
    path = lock_path(uuid)
    if path in _held:
        return f"pid {os.getpid()} (this process)"
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = path.read_text(errors="replace").strip()
            pid, _, command = text.partition(" ")
            return f"pid {pid}: {command}" if pid.isdigit() else "a gpupar run"
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
