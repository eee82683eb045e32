"""Errors of checkpoint writes that say what failed, where, and how much space it needed.

torch reports a full disk during ``torch.save`` as ``RuntimeError: [enforce fail at
inline_container.cc:...] unexpected pos ...``: the ``OSError`` of the file's ``write`` is swallowed into
the exception's context. :class:`CountingWriter` sits between torch and the file, so the save knows the
``OSError`` and how many bytes reached the disk, whatever torch turns it into.
"""

from __future__ import annotations

import errno
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from lightning_gpupar.checkpoint.keys import CheckpointError
from lightning_gpupar.devices.sizes import format_bytes

#: errno values that mean "not enough space": the message then gives the whole file's size.
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class CheckpointSaveError(CheckpointError, OSError):
    """A checkpoint could not be written; the previous file at the target is untouched.

    An ``OSError`` (``errno`` and ``filename`` are the failure's) whose text is the whole explanation.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else super().__str__()


class CountingWriter:
    """A binary file's ``write`` that counts the bytes written and remembers the first ``OSError``."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file
        self.written = 0
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            n = self.file.write(data)
        except OSError as err:
            self.error = self.error or err
            raise
        self.written += n or 0
        return n or 0

    def flush(self) -> None:
        self.file.flush()


class _SizeOnly:
    """A sink that only counts: the size the whole file would have, without holding it."""

    def __init__(self) -> None:
        self.written = 0

    def write(self, data: Any) -> int:
        n = memoryview(data).nbytes
        self.written += n
        return n

    def flush(self) -> None:
        pass


def os_error_of(err: BaseException, writer: CountingWriter | None) -> OSError | None:
    """The ``OSError`` behind a failed write: ``err`` itself, or one torch swallowed on the way."""
    if isinstance(err, OSError):
        return err
    if writer is not None and writer.error is not None:
        return writer.error
    context = err.__context__
    return context if isinstance(context, OSError) else None


def save_error(
    target: Path, cause: OSError, written: int, write: Callable[[Any], None] | None
) -> CheckpointSaveError:
    """An error naming ``target``, what the system said, the space needed and the space free."""
    reason = f"{cause.strerror or cause} (errno {errno.errorcode.get(cause.errno or 0, cause.errno)})"
    needed = _needed(cause, written, write)
    # The target is as it was before the save (writes go to a temporary file): name it only if it exists.
    kept = (
        f"The previous {target.name!r} is untouched"
        if target.exists()
        else f"No file is left at {target.name!r} (none was there before)"
    )
    message = (
        f"Could not save the checkpoint {str(target)!r}: {reason}. {needed}{_free(target.parent)}. "
        f"{kept} and no temporary file is left. "
        "Free space there, or save elsewhere (ModelCheckpoint(dirpath=...), hydra.run.dir=...)."
    )
    error = CheckpointSaveError(message)
    error.errno, error.filename = cause.errno, str(target)
    return error


def _needed(cause: OSError, written: int, write: Callable[[Any], None] | None) -> str:
    if cause.errno not in _NO_SPACE:
        return f"{_size(written)} had been written; "
    total = None
    if write is not None:
        sink = _SizeOnly()
        try:
            write(sink)
            total = sink.written
        except Exception:  # the size is a courtesy: never hide the original error
            total = None
    whole = f"of {_size(total)} needed" if total else "(the whole size is unknown)"
    return f"The save stopped after {_size(written)} {whole}; "


def _free(folder: Path) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return f"the free space in {str(folder)!r} is unknown"
    return f"{_size(free)} free in {str(folder)!r}"


def _size(n: int) -> str:
    """``704 bytes``, ``1.0 MiB (1050153 bytes)``: readable, and exact for whoever compares."""
    return f"{n} bytes" if n < 1024 else f"{format_bytes(n)} ({n} bytes)"
