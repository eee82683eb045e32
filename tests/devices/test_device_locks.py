"""Concurrent ``device_ids=auto`` runs never pick the same GPU: per-GPU locks, tested with real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lightning_gpupar.cli import devices as cli
from lightning_gpupar.devices import DeviceSelectionError, resolve_devices
from lightning_gpupar.devices.locks import LOCK_DIR_ENV
from tests.conftest import ROOT
from tests.helpers.nvml_support import FAKE_NVML_DIR, FakeNVML, fake_nvml, gpu
from tests.helpers.programs import PROGRAMS

__all__ = ["fake_nvml"]  # fixture

PROGRAM = PROGRAMS / "claim_gpu_program.py"
TIMEOUT_S = 60


def _start(gpus: list[dict[str, Any]]) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(FAKE_NVML_DIR), str(ROOT)]),
        "FAKE_NVML_GPUS": json.dumps(gpus),
        "FAKE_GPU_COUNT": str(len(gpus)),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.Popen(
        [sys.executable, str(PROGRAM)], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc


def _line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    return proc.stdout.readline().strip()


def _say(proc: subprocess.Popen[str], command: str) -> None:
    assert proc.stdin is not None
    proc.stdin.write(command + "\n")
    proc.stdin.flush()


def _stop(procs: list[subprocess.Popen[str]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            assert proc.stdin is not None
            proc.stdin.close()
    for proc in procs:
        try:
            proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.slow
def test_two_auto_runs_started_together_pick_different_gpus(fake_nvml: FakeNVML, tmp_path: Path) -> None:
    gpus = fake_nvml(gpu(0, 70), gpu(1, 60), gpu(2, 0.1))  # both runs want cuda:0; cuda:2 is too full
    procs = [_start(gpus) for _ in range(2)]
    try:
        assert [_line(p) for p in procs] == ["ready", "ready"]
        for round_ in range(5):  # a race: repeated, both runs released by the same file
            go = tmp_path / f"go{round_}"
            for proc in procs:
                _say(proc, f"claim {go}")
            go.touch()
            assert sorted(_line(p) for p in procs) == ["0", "1"], f"round {round_}"
            with pytest.raises(DeviceSelectionError, match=r"held by pid \d+") as err:
                resolve_devices("auto:1", "gpu")  # a third run: the only other GPU lacks memory
            assert "cuda:0" in str(err.value) and "cuda:1" in str(err.value)
            for proc in procs:
                _say(proc, "release")
            assert [_line(p) for p in procs] == ["released", "released"]
    finally:
        _stop(procs)


@pytest.mark.slow
def test_a_killed_holder_leaves_its_gpu_free_and_the_cli_shows_holders(
    fake_nvml: FakeNVML, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus = fake_nvml(gpu(0, 70), gpu(1, 60))
    holder = _start(gpus[:1])
    try:
        assert _line(holder) == "ready"
        (tmp_path / "go").touch()
        _say(holder, f"claim {tmp_path / 'go'}")
        assert _line(holder) == "0"
        monkeypatch.setenv("COLUMNS", "250")
        assert cli.main([]) == 0
        out = capsys.readouterr().out
        assert f"pid {holder.pid}" in out and "claim_gpu_program.py" in out
        assert "device_ids=auto picks [1]" in out and "from NVML" in out
        assert resolve_devices("auto:1", "gpu").trainer_devices == [1]
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=TIMEOUT_S)
        assert resolve_devices("auto:2", "gpu").trainer_devices == [0, 1]  # the dead run's lock is gone
    finally:
        _stop([holder])


def test_choosing_again_releases_the_previous_choice(fake_nvml: FakeNVML, tmp_path: Path) -> None:
    fake_nvml(gpu(0, 70), gpu(1, 60))
    assert resolve_devices("auto:1", "gpu").trainer_devices == [0]
    assert resolve_devices("auto:1", "gpu").trainer_devices == [0]  # this process's own lock is no obstacle
    locks = sorted(p.name for p in (Path(os.environ[LOCK_DIR_ENV])).iterdir())
    assert locks == ["GPU-00aa00.lock"]
    assert resolve_devices("auto", "gpu").trainer_devices == [0, 1]
