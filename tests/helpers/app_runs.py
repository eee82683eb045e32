"""Start ``examples/train.py`` as a user does (its own session, real signals), and end it within a bound.

Every run gets its own session, so that a test can tell whether every rank has ended (the session is
empty) and can kill all of them when a bound is exceeded, whatever the code under test does.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from tests.helpers.programs import ROOT

APP = ROOT / "examples" / "train.py"
#: A small, deterministic CPU run of the app (tiny MLP, few batches, no test set).
TINY = (
    "trainer.accelerator=cpu",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
    "trainer.num_sanity_val_steps=0",
    "trainer.limit_train_batches=5",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "model.hidden=[16]",
    "data.batch_size=16",
    "test=false",
)
#: The app's overrides for each strategy, two CPU devices where it has several.
STRATEGIES = {
    "single": ("strategy=single",),
    "dp": ("strategy=dp", "strategy.device_ids=2"),
    "model_split": ("strategy=model_split", "strategy.device_ids=2"),
    "ddp": ("strategy=ddp", "strategy.device_ids=2"),
}


def _default_sigint() -> None:
    """Give the app Ctrl-C's default disposition: a shell's background job starts with SIGINT ignored,
    which the app would inherit (and Python then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start the app in its own session, writing into ``run_dir``; output goes to ``<run_dir>.log``."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    for key in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR"):
        full_env.pop(key, None)
    log = open(run_dir.with_suffix(".log"), "w")  # noqa: SIM115  (closed with the process)
    cmd = [sys.executable, str(APP), *TINY, *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(
        cmd,
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_default_sigint,  # a run started from a background job would ignore Ctrl-C otherwise
    )
    log.close()
    return proc


def output(run_dir: Path) -> str:
    return run_dir.with_suffix(".log").read_text(errors="replace")


def finish(proc: subprocess.Popen, timeout: float, run_dir: Path) -> tuple[int, float]:
    """Wait for ``proc``; its exit status and the seconds it took. Past ``timeout`` every process of its
    session is killed and the test fails with the run's output."""
    start_time = time.monotonic()
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_session(proc.pid)
        proc.wait()
        raise AssertionError(
            f"the run was still going after {timeout} s:\n{output(run_dir)[-4000:]}"
        ) from None
    return code, time.monotonic() - start_time


def kill_session(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def session_alive(pgid: int) -> bool:
    """Whether any process of the run's session (every rank) still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition: object, timeout: float, proc: subprocess.Popen, run_dir: Path) -> None:
    """Poll ``condition()`` until true; fail (killing the run) when the run exits or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_session(proc.pid)
            proc.wait()
            raise AssertionError(
                f"the run never got there (exit {proc.returncode}):\n{output(run_dir)[-4000:]}"
            )
        time.sleep(0.05)


def children(pid: int) -> list[int]:
    """The direct child processes of ``pid`` (Linux)."""
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]


def progress(checkpoint: Path) -> tuple[int, int]:
    """(epoch, global step) of a checkpoint."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return int(ckpt["epoch"]), int(ckpt["global_step"])
