"""Several processes saving one checkpoint path: every save succeeds and the file is always whole."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_gpupar.checkpoint import atomic_torch_save, load_checkpoint_file
from lightning_gpupar.checkpoint.tempfiles import temporary_prefix

ROOT = Path(__file__).resolve().parents[2]

#: A writer: ``SAVES`` saves of a checkpoint whose tensor is filled with its own (writer, save) stamp.
WRITER = """
import sys, torch
from lightning_gpupar.checkpoint import AtomicCheckpointIO
writer, saves, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
io = AtomicCheckpointIO()
for i in range(saves):
    stamp = writer * 100000 + i
    io.save_checkpoint({"state_dict": {"w": torch.full((2**15,), float(stamp))}, "stamp": stamp}, path)
"""


def _start_writers(path: Path, writers: int, saves: int) -> list[subprocess.Popen[str]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(w), str(saves), str(path)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(writers)
    ]


def _assert_whole(path: Path) -> int:
    checkpoint = load_checkpoint_file(path)
    stamp = checkpoint["stamp"]
    assert torch.equal(checkpoint["state_dict"]["w"], torch.full((2**15,), float(stamp)))
    return int(stamp)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(2))
def test_two_writers_in_a_loop_never_fail_and_the_file_always_loads(tmp_path: Path, trial: int) -> None:
    path = tmp_path / "last.ckpt"
    saves = 150
    writers = _start_writers(path, writers=2, saves=saves)
    loads, deadline = 0, time.monotonic() + 120
    try:
        while any(w.poll() is None for w in writers) and time.monotonic() < deadline:
            if path.exists():
                _assert_whole(path)  # a reader between renames always sees one complete checkpoint
                loads += 1
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
    errors = [w.communicate(timeout=30)[1] for w in writers]
    assert [w.returncode for w in writers] == [0, 0], "\n".join(errors)[-3000:]
    assert _assert_whole(path) % 100000 == saves - 1  # the last save of one of the writers
    assert loads > 0
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left


def test_a_temporary_file_of_a_live_writer_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    live = subprocess.Popen(["sleep", "60"])  # any live process of another pid
    try:
        in_flight = tmp_path / f"{temporary_prefix(path, pid=live.pid)}abc123.tmp"
        in_flight.write_bytes(b"a save in progress")
        atomic_torch_save({"epoch": 1}, path)
        assert in_flight.exists()
    finally:
        live.kill()
        live.wait(timeout=30)
    atomic_torch_save({"epoch": 2}, path)  # its writer is gone now: the next save removes it
    assert not in_flight.exists()
    assert load_checkpoint_file(path)["epoch"] == 2


def test_another_hosts_temporary_file_is_kept_until_it_is_old(tmp_path: Path) -> None:
    path = tmp_path / "last.ckpt"
    other_host = tmp_path / f"{temporary_prefix(path, pid=1, host='other-node')}abc123.tmp"
    other_host.write_bytes(b"a save on another node")
    atomic_torch_save({"epoch": 1}, path)
    assert other_host.exists()  # its pid means nothing here: another node may still be writing it
    old = time.time() - 2 * 86400
    os.utime(other_host, (old, old))
    atomic_torch_save({"epoch": 2}, path)
    assert not other_host.exists()


def test_temporary_names_carry_the_writer(tmp_path: Path) -> None:
    prefix = temporary_prefix(tmp_path / "last.ckpt")
    assert prefix.startswith(".last.ckpt.")
    assert str(os.getpid()) in prefix
    assert socket.gethostname().split(".")[0] in prefix
