"""Lightning's SLURM auto-requeue (SIGUSR1: save ``hpc_ckpt_N.ckpt``, ``scontrol requeue $SLURM_JOB_ID``)
works in the app under our DDP strategy and launcher, and the requeued job continues from that checkpoint.

No SLURM here: the task's variables are set by hand and ``scontrol`` is a script on ``PATH`` that writes
down its arguments. One task (SLURM starts the processes, so our launcher starts none).
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path

import pytest

from tests.helpers.app_runs import (
    STRATEGIES,
    finish,
    output,
    progress,
    session_alive,
    start,
    wait_until,
)

pytestmark = pytest.mark.slow

JOB_ID = "4343"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _slurm_env(tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.calls"}\n')
    scontrol.chmod(scontrol.stat().st_mode | stat.S_IXUSR)
    return {
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_NTASKS": "1",
        "SLURM_NTASKS_PER_NODE": "1",
        "SLURM_NNODES": "1",
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": JOB_ID,
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": "0",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "0",
        "MASTER_PORT": str(_free_port()),
    }


def test_sigusr1_saves_and_requeues_and_the_requeued_job_resumes(tmp_path: Path) -> None:
    env, run = _slurm_env(tmp_path), tmp_path / "run"
    ddp_one_task = (*STRATEGIES["ddp"][:1], "strategy.device_ids=1")
    proc = start(run, *ddp_one_task, "trainer.max_epochs=1000", env=env)
    wait_until(lambda: (run / "checkpoints" / "last.ckpt").exists(), 120, proc, run)

    os.kill(proc.pid, signal.SIGUSR1)
    calls = tmp_path / "scontrol.calls"
    wait_until(calls.exists, 30, proc, run)
    assert calls.read_text().split() == ["requeue", JOB_ID]
    hpc = run / "hpc_ckpt_1.ckpt"
    wait_until(hpc.exists, 10, proc, run)
    epoch, step = progress(hpc)

    os.kill(proc.pid, signal.SIGTERM)  # what SLURM sends when the job's time is up
    code, _ = finish(proc, 30, run)
    assert code == 128 + signal.SIGTERM, output(run)[-3000:]
    assert not session_alive(proc.pid)

    # The requeued job: same command and run directory; Lightning picks up hpc_ckpt_1.ckpt by itself.
    requeued = start(run, *ddp_one_task, f"trainer.max_epochs={epoch + 2}", env=env)
    assert finish(requeued, 300, run)[0] == 0, output(run)[-3000:]
    assert f"Restored all states from the checkpoint at {hpc}" in output(run)
    assert progress(run / "checkpoints" / "last.ckpt")[0] == epoch + 1
    assert progress(run / "checkpoints" / "last.ckpt")[1] > step
