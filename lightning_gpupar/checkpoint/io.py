"""Reading and writing checkpoint files safely.

How it works: docs/internals.md, section ``lightning_gpupar/checkpoint/io.py``.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
import stat
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from lightning_gpupar.checkpoint.keys import CheckpointError
from lightning_gpupar.checkpoint.tempfiles import remove_left_behind, temporary_prefix
from lightning_gpupar.checkpoint.write_errors import (
    CheckpointSaveError,
    CountingWriter,
    os_error_of,
    save_error,
)

UNSAFE_HINT = (
    "Unpickling can run arbitrary code: opt in only for a file you trust, with weights_only=False "
    "(trainer.fit(..., ckpt_path=..., weights_only=False)) or `gpupar-ckpt ... --unsafe-unpickle`."
)


class CheckpointFileError(CheckpointError, ValueError):
    """The file is missing, truncated, corrupted or not a PyTorch checkpoint."""


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """The file holds objects that only full (unsafe) unpickling can rebuild."""


def atomic_write(path: _PATH, write: Callable[[Any], None]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, fsync it, then rename it onto ``path``.

    Any number of processes may save the same ``path`` at once: each writes its own temporary file
    (named after its pid and host), the last rename wins, and the clean-up after a save removes only
    temporary files whose writer is gone (:mod:`~lightning_gpupar.checkpoint.tempfiles`). An ``OSError``
    (a full disk included) raises :class:`CheckpointSaveError`, naming the target, the bytes written and
    needed and the space free, with the previous file untouched and the temporary file removed.
    """
    target = Path(path)
    _make_parent(target)
    writer: CountingWriter | None = None
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=temporary_prefix(target), suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as f:
            writer = CountingWriter(f)
            write(writer)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, target.stat().st_mode & 0o777 if target.exists() else 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException as err:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        cause = os_error_of(err, writer) if isinstance(err, Exception) else None
        if cause is None or isinstance(err, CheckpointSaveError):
            raise
        raise save_error(target, cause, writer.written if writer else 0, write) from err
    remove_left_behind(target)
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every OS)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _make_parent(target: Path) -> None:
    """Create ``target``'s folder; a file where a folder must be is named as such (not "File exists")."""
    blocking = next((p for p in target.parents if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise CheckpointSaveError(
            f"Cannot save {str(target)!r}: {str(blocking)!r} is a file, not a folder. "
            "Choose a path under a folder, or move that file away."
        )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise save_error(target, err, 0, None) from err


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save(obj, path)`` that never leaves a partly written ``path`` behind."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint_file(path: _PATH, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """``torch.load`` with readable errors; tensors go to ``map_location`` (default: CPU).

    A pipe (``/dev/stdin`` fed by ``cat``, a FIFO, a shell's ``<(...)``) is read whole into memory first,
    as torch's zip reader needs to seek; any other file that is not a regular one (a terminal, a device)
    is refused by name.
    """
    file = Path(path)
    if not file.exists() or file.is_dir():
        what = "is a directory" if file.is_dir() else "does not exist"
        raise FileNotFoundError(f"Checkpoint {str(file)!r} {what}.")
    if file.is_file():
        return _load(_Source(repr(str(file)), path=file), map_location, weights_only)
    mode = file.stat().st_mode
    if not (stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        kind = "a character device (a terminal, /dev/null...)" if stat.S_ISCHR(mode) else "a device"
        raise CheckpointFileError(
            f"Checkpoint {str(file)!r} is {kind}: a checkpoint is read from a regular file or a pipe "
            "(cat run.ckpt | gpupar-ckpt inspect -)."
        )
    label = f"{str(file)!r} (a pipe)"
    return _load(_Source(label, data=file.read_bytes()), map_location, weights_only)


def load_checkpoint_bytes(
    data: bytes, label: str = "stdin", map_location: Any = "cpu", weights_only: bool = True
) -> Any:
    """:func:`load_checkpoint_file` for a checkpoint's bytes (read from a pipe); ``label`` names them."""
    return _load(_Source(label, data=data), map_location, weights_only)


@dataclass(frozen=True)
class _Source:
    """A checkpoint to read: a regular file's path, or bytes read from a pipe; ``label`` names it."""

    label: str
    path: Path | None = None
    data: bytes | None = None

    def open(self) -> Path | io.BytesIO:
        return self.path if self.path is not None else io.BytesIO(self.data or b"")

    @property
    def size(self) -> int:
        return self.path.stat().st_size if self.path is not None else len(self.data or b"")

    def head(self, n: int) -> bytes:
        if self.path is None:
            return (self.data or b"")[:n]
        with self.path.open("rb") as f:
            return f.read(n)


def _load(source: _Source, map_location: Any, weights_only: bool) -> Any:
    try:
        return torch.load(source.open(), map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        needed = _globals_outside_the_allow_list(source, err) if weights_only else []
        if needed:
            raise UnsafeCheckpointError(_unsafe_message(source, needed)) from err
        raise _file_error(source, err) from err
    except Exception as err:  # torch's readers fail in many ways on bytes that are not a checkpoint
        raise _file_error(source, err) from err


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``TorchCheckpointIO`` with atomic local writes and ``weights_only=True`` loads."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if not _is_local(path):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options (got {storage_options!r}).")
        atomic_torch_save(checkpoint, _local_path(path))

    @override
    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Any | None = lambda storage, loc: storage,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        if not _is_local(path):
            return super().load_checkpoint(path, map_location, weights_only)
        checkpoint: dict[str, Any] = load_checkpoint_file(
            _local_path(path), map_location, weights_only is not False
        )
        return checkpoint


def _is_local(path: _PATH) -> bool:
    return isinstance(get_filesystem(path), LocalFileSystem)


def _local_path(path: _PATH) -> str:
    """A local path without its ``file://`` protocol (``Path`` would keep ``file:`` as a folder name)."""
    return str(LocalFileSystem._strip_protocol(str(path)))


def _umask() -> int:
    """The process's umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


#: How torch's weights-only unpickler names a global it refuses (not allow-listed, or from a blocked module).
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+) (?:was not an allowed global|whose module)")
#: Where torch's wrapped message quotes the unpickler's own words.
_UNPICKLER_SAID = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", re.DOTALL)


def _globals_outside_the_allow_list(source: _Source, err: BaseException) -> list[str]:
    """The globals a weights-only load refused; empty when the file failed for another reason.

    Only these mean "the file is fine but needs full unpickling": a corrupt, foreign or plain-pickle
    file also fails as "Weights only load failed", and must not be sent to unsafe unpickling.
    """
    if _format(source) not in ("zip", "legacy"):  # unpickling a plain pickle would not make a checkpoint
        return []
    try:
        listed = list(torch.serialization.get_unsafe_globals_in_checkpoint(source.open()))
    except Exception:  # not torch's zip format, or its pickle is broken: rely on torch's message
        listed = []
    return listed or _REFUSED_GLOBAL.findall(str(err))


#: How a zip archive's first entry starts: torch.save's format begins so, whole or cut short.
_ZIP_ENTRY = b"PK\x03\x04"


def _format(source: _Source) -> str | None:
    """Which of ``torch.save``'s formats ``source`` is in: ``"zip"``; ``"cut zip"`` (it starts as a zip
    archive but its end, the central directory, is missing: cut short); ``"legacy"``, whose first pickle
    is torch's magic number (a 10-byte ``LONG1``, near the start whatever the protocol); or ``None``."""
    if zipfile.is_zipfile(source.open()):
        return "zip"
    head = source.head(32)
    if head.startswith(_ZIP_ENTRY):
        return "cut zip"
    magic = b"\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
    return "legacy" if magic in head else None


def _unsafe_message(source: _Source, needed: list[str]) -> str:
    return (
        f"Checkpoint {source.label} cannot be loaded with weights_only=True: it needs these Python objects "
        f"rebuilt: {', '.join(needed)}. {UNSAFE_HINT} Or allow just those types: "
        "torch.serialization.add_safe_globals."
    )


def _file_error(source: _Source, err: BaseException) -> CheckpointFileError:
    said = _UNPICKLER_SAID.search(str(err))
    reason = said.group(1).strip() if said else (str(err).splitlines() or [""])[0]
    size, found = source.size, _format(source)
    if not size:
        return CheckpointFileError(
            f"{source.label} is empty (0 bytes): nothing was written there, or the pipe carried nothing. "
            "Pass a file written by torch.save or a Lightning checkpoint."
        )
    ended_early = isinstance(err, EOFError) or "EOF" in str(err) or "truncated" in str(err)
    cut = found == "cut zip" or (found == "legacy" and ended_early)
    if cut:
        ends = (
            "its end (the zip archive's central directory) is missing"
            if found == "cut zip"
            else ("its data ends early")
        )
        return CheckpointFileError(
            f"{source.label} ({size} bytes) is truncated: it starts as a checkpoint in torch.save's "
            f"{'zip' if found == 'cut zip' else 'legacy'} format, but {ends}, so the file is incomplete "
            "(a copy or download that did not finish, or a write that was cut short). Use a complete copy."
        )
    if found is None:  # torch's words would suggest allow-listing
        return CheckpointFileError(
            f"{source.label} ({size} bytes) is not a readable PyTorch checkpoint: it is in neither of "
            "torch.save's formats (a zip archive, or the legacy format), e.g. a plain pickle or another "
            "kind of file. Pass a file written by torch.save or a Lightning checkpoint."
        )
    what = (
        "is a zip archive, corrupted or of other files"
        if found == "zip"
        else ("starts in torch.save's legacy format but is corrupted")
    )
    return CheckpointFileError(
        f"{source.label} ({size} bytes) is not a readable PyTorch checkpoint: it {what}. torch said: "
        f"{type(err).__name__}: {reason or type(err).__name__}"
    )
