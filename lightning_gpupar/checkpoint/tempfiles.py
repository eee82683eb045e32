"""Temporary files of atomic saves, named after their writer, and which of them a writer left behind.

A save to ``NAME`` writes ``.NAME.<pid>@<host>@<random>.tmp`` next to it, then renames it onto ``NAME``.
After its own rename, a save removes the temporary files of ``NAME`` whose writer is gone: a process of
this host that no longer exists (``os.kill(pid, 0)``), a writer on another host (a shared filesystem)
whose file has not changed for :data:`OTHER_HOST_STALE_S`, or a file named by an earlier version of this
package, which carried no writer. Files of live writers, other saves in flight, are never touched.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import socket
import time
from pathlib import Path

#: Seconds after which a temporary file written on another host counts as left behind.
OTHER_HOST_STALE_S = 24 * 3600.0

#: ``RANDOM`` of ``mkstemp`` and our ``<pid>@<host>@`` prefix hold no dot, so ``.NAME.bak.X.tmp`` (a save
#: of ``NAME.bak``) is never taken for one of ``NAME``'s.
_SEGMENT = r"(?:(?P<pid>[0-9]+)@(?P<host>[A-Za-z0-9-]+)@)?[^.@]+"


def this_host() -> str:
    """This machine's name as it appears in temporary file names (letters, digits and ``-`` only)."""
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "localhost"


def temporary_prefix(target: Path, pid: int | None = None, host: str | None = None) -> str:
    """The ``mkstemp`` prefix of a save to ``target`` by process ``pid`` (default: this one) on ``host``."""
    return f".{target.name}.{os.getpid() if pid is None else pid}@{host or this_host()}@"


def remove_left_behind(target: Path) -> list[Path]:
    """Delete the temporary files of saves to ``target`` whose writer is gone; return them."""
    own = re.compile(rf"\.{re.escape(target.name)}\.{_SEGMENT}\.tmp")
    removed = []
    for candidate in target.parent.glob(f".{glob.escape(target.name)}.*.tmp"):
        match = own.fullmatch(candidate.name)
        if match is None or not _writer_gone(candidate, match.group("pid"), match.group("host")):
            continue
        with contextlib.suppress(OSError):  # removed meanwhile by another writer's clean-up
            candidate.unlink()
            removed.append(candidate)
    return removed


def _writer_gone(file: Path, pid: str | None, host: str | None) -> bool:
    if pid is None:  # an earlier version's name: no writer recorded
        return True
    if host != this_host():
        try:
            return time.time() - file.stat().st_mtime > OTHER_HOST_STALE_S
        except FileNotFoundError:
            return False
    return not _alive(int(pid))


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one of another user counts as alive)."""
    if pid == os.getpid():
        return True  # another thread of this process may be saving the same path
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
