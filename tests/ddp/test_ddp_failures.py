"""When a rank fails, every rank stops soon and the user sees why; layout mistakes fail before DDP starts."""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_gpupar.ddp.launcher import DDPLaunchError, _report_failed_children
from lightning_gpupar.ddp.rendezvous import CONNECT_BOUND_ENV
from tests.helpers.programs import ROOT, preserved_environ, python, run_bounded
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
def test_a_killed_rank_is_not_said_to_have_printed_its_error(tmp_path: Path) -> None:
    """Rank 1 dies by SIGKILL (as under the out-of-memory killer): it printed nothing, so rank 0's report
    names the signal instead of pointing at an error "printed above"."""
    finished = run_bounded(
        python("tiny_fit.py", "--devices", "2", "--kill-rank", "1", "--timeout", str(HANG_TIMEOUT_S)),
        timeout=BOUND_S,
        cwd=tmp_path,
    )
    assert finished.returncode != 0
    assert re.search(
        r"Rank 1 \(pid \d+\) was killed by signal SIGKILL \(9\) before rank 0 failed, so it "
        r"printed no error",
        finished.stderr,
    ), finished.stderr[-3000:]
    assert "printed above" not in finished.stderr
    assert session_is_empty(finished.pgid)


def test_the_report_points_above_only_for_a_rank_that_printed(caplog: pytest.LogCaptureFixture) -> None:
    class Child:
        def __init__(self, code: int | None, pid: int) -> None:
            self.code, self.pid = code, pid

        def poll(self) -> int | None:
            return self.code

    children: list[Any] = [Child(1, 11), Child(-signal.SIGKILL, 12), Child(0, 13), Child(-signal.SIGTERM, 14)]
    with caplog.at_level(logging.ERROR):
        _report_failed_children(children, node_offset=4)
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "Rank 5 (pid 11) exited with code 1 before rank 0 failed: its error, printed above with the prefix "
        "[rank5], is the cause.",
        "Rank 6 (pid 12) was killed by signal SIGKILL (9) before rank 0 failed, so it printed no error: the "
        "cause is outside the run (the out-of-memory killer: see `dmesg`; a kill by a user or a scheduler).",
        "Rank 8 (pid 14) was killed by signal SIGTERM (15) before rank 0 failed, so it printed no error: the "
        "cause is outside the run (the out-of-memory killer: see `dmesg`; a kill by a user or a scheduler).",
    ]


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


# -- launch variables that cannot work fail in seconds, by name, instead of after strategy.timeout --------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def silent_port() -> Iterator[int]:
    """A local port where connections get no answer at all, as at a machine behind a dropping firewall:
    a listener that never accepts, its backlog full, so Linux drops further SYNs without a reply."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = [socket.socket() for _ in range(3)]
        try:
            for filler in fillers:
                filler.setblocking(False)
                filler.connect_ex(("127.0.0.1", port))
            time.sleep(0.2)
            yield port
        finally:
            for filler in fillers:
                filler.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    ("env", "args", "phrase"),
    [
        (
            {"NODE_RANK": "1"},
            ["--devices", "2"],
            "NODE_RANK=1 (LightningEnvironment), but trainer.num_nodes=1: node ranks 0..0 exist",
        ),
        (
            {"NODE_RANK": "1", "MASTER_ADDR": "node-0.gpupar.invalid"},
            ["--devices", "1", "--num-nodes", "2"],
            "MASTER_ADDR='node-0.gpupar.invalid' does not resolve to an address",
        ),
        (
            {"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "silent", CONNECT_BOUND_ENV: "3"},
            ["--devices", "1", "--num-nodes", "2"],
            "MASTER_ADDR='127.0.0.1' gave no answer on MASTER_PORT=",
        ),
    ],
    ids=["node-rank-left-in-the-shell", "master-addr-unresolved", "master-addr-silent"],
)
def test_a_launch_variable_that_cannot_work_fails_in_seconds_by_name(
    tmp_path: Path, env: dict[str, str], args: list[str], phrase: str
) -> None:
    with silent_port() as port:  # for the row that asks for a port where nothing answers
        if env.get("MASTER_PORT") == "silent":
            env = {**env, "MASTER_PORT": str(port)}
        finished = run_bounded(
            python("tiny_fit.py", *args, "--timeout", str(HANG_TIMEOUT_S)),
            timeout=BOUND_S,
            cwd=tmp_path,
            env={"MASTER_PORT": str(free_port()), **env},
        )
    assert finished.returncode == 1, finished.stderr[-3000:]
    assert f"DDPConfigError: {phrase}" in finished.stderr, finished.stderr[-3000:]
    assert "Initializing distributed" not in finished.stderr  # failed before the rendezvous
    assert "GLOBAL_RANK: 1" not in finished.stdout + finished.stderr  # and before any child started
    assert session_is_empty(finished.pgid)


@pytest.mark.slow
def test_node_1_may_start_before_node_0(tmp_path: Path) -> None:
    """Node 1 finds nothing listening at MASTER_ADDR (refused: the machine answers) and waits, as torch
    does, for a node 0 that starts after its connect bound has passed; both then train."""
    common = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), CONNECT_BOUND_ENV: "1"}
    command = python("tiny_fit.py", "--devices", "1", "--num-nodes", "2", "--timeout", "120")
    log = tmp_path / "node1.err"
    with log.open("w") as err:
        node1 = subprocess.Popen(
            command,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT), **common, "NODE_RANK": "1"},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + BOUND_S
        while "Initializing distributed: GLOBAL_RANK: 1" not in log.read_text():  # past the checks
            assert node1.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(2)  # longer than the connect bound: node 1 now waits in torch's rendezvous
        node0 = run_bounded(command, timeout=120, cwd=tmp_path, env={**common, "NODE_RANK": "0"})
        out1, _ = node1.communicate(timeout=120)
    finally:
        if node1.poll() is None:
            os.killpg(node1.pid, signal.SIGKILL)
    assert node0.returncode == 0, node0.stderr[-3000:]
    assert node1.returncode == 0, log.read_text()[-3000:]
    assert "rank 0 of 2 finished" in node0.stdout and "rank 1 of 2 finished" in out1
