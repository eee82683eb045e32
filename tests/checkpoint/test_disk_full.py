"""A save that fails for lack of space (or any OSError): a clear error, the previous file kept, no litter."""

from __future__ import annotations

import errno
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gpupar.checkpoint import AtomicCheckpointIO, CheckpointError, load_checkpoint_file
from lightning_gpupar.checkpoint.io import atomic_write
from lightning_gpupar.checkpoint.write_errors import CheckpointSaveError

SMALL_FS_BYTES = 2**20


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root and a kernel that lets us mount; skipped elsewhere)."""
    mount = tmp_path / "small"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS_BYTES}", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True, timeout=30)


def _checkpoint(numel: int, epoch: int) -> dict[str, Any]:
    return {"state_dict": {"w": torch.ones(numel)}, "epoch": epoch}


def _numbers(message: str) -> list[int]:
    return [int(n) for n in re.findall(r"\b(\d+) bytes\b", message)]


def test_a_full_filesystem_names_the_target_the_space_needed_and_free(small_fs: Path) -> None:
    target = small_fs / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1000, epoch=1), target)
    with pytest.raises(CheckpointSaveError) as info:
        AtomicCheckpointIO().save_checkpoint(_checkpoint(2**18, epoch=2), target)  # 1 MiB of floats
    message = str(info.value)
    assert str(target) in message
    assert "No space left on device" in message and "ENOSPC" in message
    written, needed, free = _numbers(message)
    assert 0 < written < needed
    assert needed > 2**20  # the whole serialised checkpoint
    assert free == shutil.disk_usage(small_fs).free
    assert "is untouched and no temporary file is left" in message
    assert isinstance(info.value, OSError) and info.value.errno == errno.ENOSPC
    assert isinstance(info.value, CheckpointError)
    assert "inline_container" not in message
    assert load_checkpoint_file(target)["epoch"] == 1
    assert [p.name for p in small_fs.iterdir()] == ["last.ckpt"]


def test_after_a_full_disk_a_smaller_save_succeeds(small_fs: Path) -> None:
    target = small_fs / "last.ckpt"
    with pytest.raises(CheckpointSaveError):
        AtomicCheckpointIO().save_checkpoint(_checkpoint(2**19, epoch=1), target)
    AtomicCheckpointIO().save_checkpoint(_checkpoint(1000, epoch=2), target)  # the space was given back
    assert load_checkpoint_file(target)["epoch"] == 2


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint(_checkpoint(10, epoch=1), path)
    return path


def _kept(previous: Path) -> None:
    assert load_checkpoint_file(previous)["epoch"] == 1
    assert [p.name for p in previous.parent.iterdir()] == ["last.ckpt"]


def test_an_injected_enospc_in_write_reports_the_whole_size(previous: Path) -> None:
    data = os.urandom(5000)

    def write_then_fail(f: Any) -> None:
        f.write(data[:3000])
        if not hasattr(f, "file"):  # the size-only rerun: let it count the whole file
            f.write(data[3000:])
            return
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with pytest.raises(CheckpointSaveError) as info:
        atomic_write(previous, write_then_fail)
    written, needed, _free = _numbers(str(info.value))
    assert (written, needed) == (3000, 5000)
    _kept(previous)


@pytest.mark.parametrize(
    ("call", "code"),
    [("fsync", errno.EIO), ("replace", errno.EROFS), ("chmod", errno.EPERM), ("mkstemp", errno.EDQUOT)],
)
def test_an_injected_oserror_anywhere_in_the_save_is_reported(
    previous: Path, monkeypatch: pytest.MonkeyPatch, call: str, code: int
) -> None:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    module = __import__("tempfile") if call == "mkstemp" else os
    monkeypatch.setattr(module, call, fail)
    with pytest.raises(CheckpointSaveError) as info:
        AtomicCheckpointIO().save_checkpoint(_checkpoint(10, epoch=2), previous)
    monkeypatch.undo()
    message = str(info.value)
    assert str(previous) in message and os.strerror(code) in message
    assert errno.errorcode[code] in message and "free in" in message
    assert info.value.errno == code
    _kept(previous)


def test_a_torch_save_failing_on_a_full_disk_is_reported_not_as_torch_words(
    previous: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch turns the file's OSError into ``RuntimeError: [enforce fail at inline_container.cc]``."""
    calls = {"n": 0}

    class FullAfterSomeWrites:
        def __init__(self, f: Any) -> None:
            self.f = f

        def write(self, data: Any) -> int:
            calls["n"] += 1
            if calls["n"] > 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return int(self.f.write(data))

        def flush(self) -> None:
            self.f.flush()

    def save(f: Any) -> None:
        sink: Any = FullAfterSomeWrites(f) if hasattr(f, "file") else f
        torch.save(_checkpoint(2**16, epoch=2), sink)

    with pytest.raises(CheckpointSaveError, match="No space left on device") as info:
        atomic_write(previous, save)
    assert isinstance(info.value.__cause__, RuntimeError)  # what torch raised, kept as the cause
    _kept(previous)


def _full_disk(file: Any) -> None:
    file.write(b"x" * 100)
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_first_save_that_fails_mentions_no_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    with pytest.raises(CheckpointSaveError) as info:
        atomic_write(target, _full_disk)
    message = str(info.value)
    assert "previous" not in message, message
    assert "No file is left at 'last.ckpt' (none was there before)" in message, message
    assert list(tmp_path.iterdir()) == []


def test_a_failed_save_over_a_file_says_it_is_untouched(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"old")
    with pytest.raises(CheckpointSaveError) as info:
        atomic_write(target, _full_disk)
    assert "The previous 'last.ckpt' is untouched and no temporary file is left" in str(info.value)
    assert target.read_bytes() == b"old"
