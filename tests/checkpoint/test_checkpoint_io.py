"""Checkpoint files: atomic writes under real interruptions, safe loads, readable errors, cuda:3 on CPU."""

from __future__ import annotations

import os
import pickle
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.serialization

from lightning_gpupar.checkpoint import (
    AtomicCheckpointIO,
    CheckpointFileError,
    UnsafeCheckpointError,
    atomic_torch_save,
    load_checkpoint_file,
)
from lightning_gpupar.checkpoint.io import atomic_write
from tests.helpers.checkpoint_support import saving_as_cuda3


class Bomb:
    """Pickling this raises, after the tensors before it were already serialised."""

    def __reduce__(self) -> Any:
        raise RuntimeError("interrupted mid-save")


class Custom:
    """Any class: loading it needs full unpickling."""


@pytest.fixture
def previous(tmp_path: Path) -> Path:
    path = tmp_path / "last.ckpt"
    atomic_torch_save({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, path)
    return path


def test_an_exception_mid_save_leaves_the_previous_checkpoint(previous: Path) -> None:
    with pytest.raises(RuntimeError, match="interrupted mid-save"):
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.zeros(3)}, "bad": Bomb()}, previous)
    assert load_checkpoint_file(previous)["epoch"] == 1
    assert [p.name for p in previous.parent.iterdir()] == ["last.ckpt"]  # no temporary file left


@pytest.mark.slow
def test_sigkill_while_writing_a_large_checkpoint_leaves_the_previous_one(previous: Path) -> None:
    code = (
        "import sys, torch; from lightning_gpupar.checkpoint import AtomicCheckpointIO; "
        "big = {'state_dict': {'w': torch.ones(2**26)}, 'epoch': 2}; "
        "AtomicCheckpointIO().save_checkpoint(big, sys.argv[1])"
    )
    child = subprocess.Popen([sys.executable, "-c", code, str(previous)])
    try:
        partial = _wait_for_partial_temp_file(previous.parent, child)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert partial is not None, "the child finished before it could be killed mid-write"
    assert child.returncode == -signal.SIGKILL
    assert load_checkpoint_file(previous)["epoch"] == 1
    assert partial.exists()  # what the kill left behind ...
    AtomicCheckpointIO().save_checkpoint({"state_dict": {}, "epoch": 3}, previous)
    assert [p.name for p in previous.parent.iterdir()] == ["last.ckpt"]  # ... the next save removes


def test_a_save_removes_stale_temporary_files_of_its_own_target_only(previous: Path) -> None:
    folder = previous.parent
    stale = [folder / ".last.ckpt.k1ll3d.tmp", folder / ".last.ckpt.x_y.tmp"]
    others = [folder / ".other.ckpt.k1ll3d.tmp", folder / ".last.ckpt.keep", folder / "x.last.ckpt.a.tmp"]
    for path in stale + others:
        path.write_bytes(b"partial")
    atomic_torch_save({"epoch": 2}, previous)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in others)
    assert load_checkpoint_file(previous)["epoch"] == 2


def test_a_save_keeps_the_temporary_file_of_a_target_whose_name_starts_the_same(previous: Path) -> None:
    backup = previous.with_name("last.ckpt.bak")
    stale_backup = previous.with_name(".last.ckpt.bak.k1ll3d.tmp")
    stale_backup.write_bytes(b"partial")

    def write_backup_while_last_is_saved(f: Any) -> None:
        torch.save({"epoch": 9}, f)
        atomic_torch_save({"epoch": 2}, previous)  # must not delete .last.ckpt.bak.XXXXXXXX.tmp

    atomic_write(backup, write_backup_while_last_is_saved)
    assert (load_checkpoint_file(backup)["epoch"], load_checkpoint_file(previous)["epoch"]) == (9, 2)
    assert sorted(p.name for p in previous.parent.iterdir()) == ["last.ckpt", "last.ckpt.bak"]
    assert not stale_backup.exists()  # removed by the save of last.ckpt.bak, its own target


def _wait_for_partial_temp_file(folder: Path, child: subprocess.Popen[bytes]) -> Path | None:
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        for tmp in folder.glob(".last.ckpt.*.tmp"):
            if tmp.stat().st_size > 2**20:
                return tmp
        time.sleep(0.002)
    return None


@pytest.mark.parametrize(
    ("content", "kind"),
    [
        (b"", "empty"),
        (b"this is a text file, not a checkpoint\n", "text"),
        (None, "truncated"),
        (None, "corrupted"),
    ],
)
def test_unreadable_files_give_a_clear_error(previous: Path, content: bytes | None, kind: str) -> None:
    data = previous.read_bytes()
    if kind == "truncated":
        content = data[: len(data) // 2]
    elif kind == "corrupted":
        content = data[:100] + bytes(200) + data[300:]
    bad = previous.with_name(f"{kind}.ckpt")
    bad.write_bytes(content or b"")
    said = {"empty": "is empty (0 bytes)", "truncated": "is truncated"}.get(kind, "not a readable PyTorch")
    with pytest.raises(CheckpointFileError, match=re.escape(said)) as err:
        load_checkpoint_file(bad)
    assert str(bad) in str(err.value)
    assert bad.read_bytes() == (content or b"")


def _zero_inside_the_pickle(path: Path) -> bytes:
    """The file with bytes zeroed inside its ``data.pkl`` (stored uncompressed, so found verbatim)."""
    data = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        pickled = archive.read(next(n for n in archive.namelist() if n.endswith("/data.pkl")))
    start = data.index(pickled) + 10
    return data[:start] + bytes(20) + data[start + 20 :]


@pytest.mark.parametrize("kind", ["zeroed-pickle", "random", "plain-pickle"])
def test_broken_or_foreign_files_are_not_called_unsafe(previous: Path, kind: str) -> None:
    bad = previous.with_name(f"{kind}.ckpt")
    if kind == "zeroed-pickle":
        bad.write_bytes(_zero_inside_the_pickle(previous))
    elif kind == "random":
        bad.write_bytes(random.Random(0).randbytes(4096))
    else:
        with bad.open("wb") as f:
            pickle.dump({"state_dict": {"w": [1.0, 2.0]}}, f)
    with pytest.raises(CheckpointFileError, match="not a readable PyTorch checkpoint") as err:
        load_checkpoint_file(bad)
    message = str(err.value)
    assert not isinstance(err.value, UnsafeCheckpointError)
    assert "weights_only" not in message and "unsafe" not in message.lower(), message


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_a_pickled_custom_class_is_called_unsafe(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "custom.ckpt"
    torch.save({"state_dict": {}, "extra": Custom()}, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(UnsafeCheckpointError, match=r"test_checkpoint_io\.Custom.*--unsafe-unpickle"):
        load_checkpoint_file(path)


def test_missing_file_and_directory_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint_file(tmp_path / "nope.ckpt")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        load_checkpoint_file(tmp_path)


def test_unpickling_needs_an_explicit_opt_in(tmp_path: Path) -> None:
    path = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": {}, "extra": Custom()}, path)
    with pytest.raises(UnsafeCheckpointError) as err:
        AtomicCheckpointIO().load_checkpoint(path)  # Lightning passes weights_only=None
    message = str(err.value)
    assert "Custom" in message and "weights_only=False" in message and "--unsafe-unpickle" in message
    assert isinstance(err.value, pickle.UnpicklingError)
    loaded = AtomicCheckpointIO().load_checkpoint(path, weights_only=False)
    assert isinstance(loaded["extra"], Custom)


@pytest.fixture
def save_as_cuda3() -> Iterator[None]:
    with saving_as_cuda3():
        yield


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks loading on a machine without CUDA")
def test_a_checkpoint_saved_on_cuda3_loads_on_cpu(tmp_path: Path, save_as_cuda3: None) -> None:
    path = tmp_path / "gpu.ckpt"
    torch.save({"state_dict": {"w": torch.arange(4.0)}}, path)
    with pytest.raises(RuntimeError, match="CUDA"):
        torch.load(path, weights_only=True)  # proves the file claims a CUDA device
    for loaded in (load_checkpoint_file(path), AtomicCheckpointIO().load_checkpoint(path)):
        torch.testing.assert_close(loaded["state_dict"]["w"], torch.arange(4.0))
        assert loaded["state_dict"]["w"].device.type == "cpu"


def test_file_urls_are_written_and_read_where_they_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    io = AtomicCheckpointIO()
    url = f"file://{tmp_path}/out/a.ckpt"
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}}, url)
    assert (tmp_path / "out" / "a.ckpt").is_file()
    assert not (tmp_path / "file:").exists()
    assert torch.equal(io.load_checkpoint(url)["state_dict"]["w"], torch.ones(2))


def test_new_checkpoints_honour_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o077)
    try:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {}}, tmp_path / "private.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "private.ckpt").stat().st_mode & 0o777 == 0o600
