"""When a rank fails, every rank stops soon and the user sees why; layout mistakes fail before DDP starts."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest
import torch

from lightning_gpupar.ddp.launcher import DDPLaunchError
from tests.helpers.programs import preserved_environ, python, run_bounded
from tests.helpers.programs.tiny_fit import Tiny, make_data, make_trainer

#: Seconds within which a failed run must have ended, every rank included (imports take most of it).
BOUND_S = 90
#: The failing runs' process-group timeout: far beyond the bound, so a rank left waiting in a
#: collective until the timeout fails the test instead of passing within it.
HANG_TIMEOUT_S = 1200


def session_is_empty(pgid: int, wait_s: float = 10.0) -> bool:
    """True when no process of the program's session is left (no orphaned rank)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    os.killpg(pgid, signal.SIGKILL)
    return False


@pytest.mark.slow
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_one_failing_rank_stops_every_rank_with_its_error(tmp_path: Path, failing_rank: int) -> None:
    finished = run_bounded(
        python(
            "tiny_fit.py",
            "--devices",
            "2",
            "--fail-rank",
            str(failing_rank),
            "--timeout",
            str(HANG_TIMEOUT_S),
        ),
        timeout=BOUND_S,
        cwd=tmp_path,
    )
    assert finished.returncode != 0
    assert f"RuntimeError: boom on rank {failing_rank}" in finished.stderr
    blames_rank_1 = re.search(
        r"Rank 1 \(pid \d+\) exited with code 1 before rank 0 failed: its error, printed above with the "
        r"prefix \[rank1\], is the cause\.",
        finished.stderr,
    )
    assert bool(blames_rank_1) == (failing_rank == 1)
    assert "finished" not in finished.stdout
    assert session_is_empty(finished.pgid)


@pytest.mark.slow
def test_a_busy_master_port_is_named_before_any_rank_starts(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        finished = run_bounded(
            python("tiny_fit.py", "--devices", "2"),
            timeout=BOUND_S,
            cwd=tmp_path,
            env={"MASTER_PORT": str(port)},
        )
    assert finished.returncode != 0
    assert f"DDPLaunchError: MASTER_PORT={port} is already in use" in finished.stderr
    assert "Unset MASTER_PORT" in finished.stderr
    assert "GLOBAL_RANK: 1" not in finished.stderr + finished.stdout  # no second rank was started


def fit_under(env: dict[str, str], devices: int, num_nodes: int = 1) -> None:
    """Fit in this process as one rank of an externally started job (torchrun, SLURM): nothing is spawned."""
    os.environ.update(env)
    make_trainer(devices, num_nodes).fit(Tiny(), make_data())


def torchrun_env(world_size: int, local_rank: int) -> dict[str, str]:
    return {
        "TORCHELASTIC_RUN_ID": "test",
        "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size),
        "RANK": str(local_rank),
        "LOCAL_RANK": str(local_rank),
        "GROUP_RANK": "0",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": "29999",
    }


@pytest.mark.parametrize(
    ("world_size", "local_rank", "message"),
    [
        (4, 0, "TorchElasticEnvironment reports 4 processes in total, but the strategy expects 2 device"),
        (3, 2, "This process has local rank 2 (TorchElasticEnvironment), but the strategy has 2 device"),
    ],
)
def test_more_processes_than_devices_fails_before_the_process_group(
    world_size: int, local_rank: int, message: str
) -> None:
    with preserved_environ(), pytest.raises(DDPLaunchError, match="^" + re.escape(message)):
        fit_under(torchrun_env(world_size, local_rank), devices=2)
    assert not torch.distributed.is_initialized()
