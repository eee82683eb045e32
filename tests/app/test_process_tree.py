"""gpu_check's time limit ends every process the CUDA tests started, also in sessions of their own
(issue 23, point 6): a fake long-running test that starts a "rank" with ``setsid``."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from benchmarks.process_tree import run_bounded


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat")
    return not (state.exists() and state.read_text().rsplit(")", 1)[1].split()[0] == "Z")


@pytest.mark.skipif(shutil.which("setsid") is None or not Path("/proc").is_dir(), reason="setsid, /proc")
def test_on_timeout_every_process_started_is_killed_also_in_its_own_session(tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f"setsid sleep 300 & echo $! > {pids}; sleep 300 & echo $! >> {pids}; wait"
    started = time.monotonic()
    done = run_bounded(["sh", "-c", script], timeout=1.0)
    assert done.timed_out and time.monotonic() - started < 30
    ranks = [int(p) for p in pids.read_text().split()]
    assert len(ranks) == 2
    deadline = time.monotonic() + 5
    while any(_alive(p) for p in ranks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [p for p in ranks if _alive(p)], "a process the command started outlived the time limit"


def test_a_command_that_finishes_in_time_keeps_its_status_and_output() -> None:
    done = run_bounded(["sh", "-c", "echo out; echo err >&2; exit 3"], timeout=30)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
