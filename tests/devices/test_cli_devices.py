"""`gpupar-devices` on a machine without CUDA, and its table with mocked GPUs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable

import pytest

from lightning_gpupar.cli import devices as cli
from lightning_gpupar.devices import GPUInfo, GPUInventory


@pytest.mark.slow
def test_without_cuda_says_so_and_offers_cpu_replicas(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    result = subprocess.run(
        [sys.executable, "-m", "lightning_gpupar.cli.devices"], capture_output=True, text=True, check=True
    )
    assert "No CUDA device is visible" in result.stdout
    assert "CPU replicas are available" in result.stdout
    assert "strategy.device_ids=2" in result.stdout


def test_table_shows_memory_and_the_auto_pick(
    fake_gpus: Callable[..., list[GPUInfo]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    gpus = fake_gpus(10, 40, 0.5, 30)
    monkeypatch.setattr(
        cli, "query_inventory", lambda: GPUInventory(tuple(gpus), "torch.cuda.mem_get_info", "x")
    )
    monkeypatch.setenv("COLUMNS", "200")
    assert cli.main(["--min-free-memory", "20GiB"]) == 0
    out = capsys.readouterr().out
    assert "Fake H100" in out
    assert "40.0 GiB" in out
    assert "device_ids=auto picks [1, 3]" in out
    assert "Memory from torch.cuda.mem_get_info" in out and "nvidia-ml-py" in out  # says which source


def test_an_unreadable_memory_size_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--min-free-memory", "10parsecs"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--min-free-memory" in err and "'10parsecs'" in err and "10GiB" in err
    assert "Traceback" not in err
