"""One run per run directory: a second live run is refused, ranks of one DDP run share it, a dead run's
lock does not count."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lightning_gpupar.config.run_dir import LOCK_NAME, RunDirError, RunDirLock, another_rank_of_a_run
from lightning_gpupar.devices import LAUNCHER_PID_ENV

ROOT = Path(__file__).resolve().parents[2]
QUICK = [
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
]


def _app(run_dir: Path, *overrides: str) -> list[str]:
    return [sys.executable, str(ROOT / "examples" / "train.py"), f"hydra.run.dir={run_dir}", *overrides]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "NODE_RANK", "WORLD_SIZE")}
    return {**env, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _wait_for_lock(run_dir: Path, proc: subprocess.Popen[str], timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    lock = run_dir / LOCK_NAME
    while time.monotonic() < deadline and proc.poll() is None:
        if lock.exists() and lock.read_text().strip():
            return lock.read_text()
        time.sleep(0.1)
    raise AssertionError(f"the first run never locked {run_dir} (exit code {proc.poll()})")


@pytest.mark.slow
def test_a_second_run_in_a_held_directory_is_refused_and_a_killed_runs_is_free(tmp_path: Path) -> None:
    first = subprocess.Popen(
        _app(tmp_path, *QUICK, "trainer.max_epochs=100000", "trainer.limit_train_batches=null"),
        env=_env(),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert f"pid {first.pid} " in _wait_for_lock(tmp_path, first)
        second = subprocess.run(
            _app(tmp_path, *QUICK, "seed=7"), env=_env(), capture_output=True, text=True, timeout=120
        )
        assert second.returncode == 1, second.stderr[-3000:]
        assert "is in use by another live run" in second.stderr
        assert f"pid {first.pid} on" in second.stderr and f"hydra.run.dir='{tmp_path}'" in second.stderr
        assert "seed: 7" not in (tmp_path / ".hydra" / "config.yaml").read_text()  # nothing overwritten
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    third = subprocess.run(_app(tmp_path, *QUICK), env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]  # the killed run's lock went with it


@pytest.mark.slow
def test_the_ranks_of_one_ddp_run_share_its_directory(tmp_path: Path) -> None:
    done = subprocess.run(
        _app(tmp_path, *QUICK, "strategy=ddp", "strategy.device_ids=2"),
        env=_env(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "in use by another live run" not in done.stderr
    assert (tmp_path / "train_rank1.log").is_file()


def test_a_held_directory_names_its_holder(tmp_path: Path) -> None:
    held = rf"in use by another live run \(pid {os.getpid()} on "
    with RunDirLock(tmp_path), pytest.raises(RunDirError, match=held):
        RunDirLock(tmp_path).acquire()
    with RunDirLock(tmp_path):  # released: free again
        pass


def test_a_run_dir_under_a_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=r"'.*file' is a file, not a folder"):
        RunDirLock(tmp_path / "file" / "run").acquire()


@pytest.mark.parametrize(
    ("env", "other_rank"),
    [
        ({}, False),
        ({LAUNCHER_PID_ENV: "1"}, True),  # started by our launcher (pid 1 is not this process)
        ({LAUNCHER_PID_ENV: "self", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}, False),  # the launcher itself
        ({"RANK": "3", "WORLD_SIZE": "4"}, True),  # torchrun
        ({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "4"}, False),
        ({"SLURM_PROCID": "1"}, True),
        ({"NODE_RANK": "1", "LOCAL_RANK": "0"}, True),  # local rank 0 of the second node
        ({"LOCAL_RANK": "1"}, True),  # Lightning's own launcher
    ],
)
def test_which_processes_are_other_ranks_of_a_run(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], other_rank: bool
) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID", "WORLD_SIZE", LAUNCHER_PID_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, str(os.getpid()) if value == "self" else value)
    assert another_rank_of_a_run() is other_rank
