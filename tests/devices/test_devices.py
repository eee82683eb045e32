"""Device requests -> concrete devices, against mocked CUDA inventories."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lightning_gpupar.devices import (
    AUTO_IDS_ENV,
    DeviceSelectionError,
    GPUInfo,
    auto_select,
    parse_bytes,
    resolve_devices,
)

GiB = 2**30


@pytest.mark.parametrize(
    ("request_", "accelerator", "expected"),
    [
        ([0, 3], "auto", ["cuda:0", "cuda:3"]),
        ([3, 0], "gpu", ["cuda:3", "cuda:0"]),
        ("0,3", "cuda", ["cuda:0", "cuda:3"]),
        ("[1,2]", "auto", ["cuda:1", "cuda:2"]),
        (2, "auto", ["cuda:0", "cuda:1"]),
        ("2", "gpu", ["cuda:0", "cuda:1"]),
        (-1, "auto", ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]),
        ("auto", "auto", ["cuda:1", "cuda:3", "cuda:0"]),  # most free first; cuda:2 below the minimum
        ("auto:2", "gpu", ["cuda:1", "cuda:3"]),
        (None, "auto", ["cuda:1", "cuda:3", "cuda:0"]),
        (2, "cpu", ["cpu", "cpu"]),
        ([0, 1, 2], "cpu", ["cpu", "cpu", "cpu"]),
        ("cpu", "auto", ["cpu", "cpu"]),
        ("auto", "cpu", ["cpu", "cpu"]),
    ],
)
def test_requests_resolve_on_four_gpus(
    fake_gpus: Callable[..., list[GPUInfo]], request_: object, accelerator: str, expected: list[str]
) -> None:
    fake_gpus(10, 40, 0.5, 30)
    selection = resolve_devices(request_, accelerator, default_cpu_count=2)  # type: ignore[arg-type]
    assert [str(d) for d in selection.devices] == expected
    assert selection.accelerator == ("cpu" if expected[0] == "cpu" else "cuda")


def test_trainer_devices_are_ids_for_cuda_and_a_count_for_cpu(
    fake_gpus: Callable[..., list[GPUInfo]],
) -> None:
    fake_gpus(10, 10, 10, 10)
    assert resolve_devices([0, 3]).trainer_devices == [0, 3]
    assert resolve_devices(3, "cpu").trainer_devices == 3


@pytest.mark.parametrize(
    ("request_", "accelerator", "message"),
    [
        ([0, 4], "auto", "no GPU with id 4"),
        ([0, 4], "auto", "ids 0..3 exist"),
        ([1, 1], "gpu", "id 1 appears more than once"),
        ([0, -2], "gpu", "ids must be >= 0"),
        (5, "gpu", "asks for 5 GPUs but this process sees 4"),
        (0, "gpu", "not a device count"),
        ([], "gpu", "is empty"),
        ("zero,one", "gpu", "not a device request"),
        (True, "gpu", "not a device request"),
        ([0, 3], "cpu", "Write strategy.device_ids=2"),
        ([0, 1], "tpu", "Unknown accelerator 'tpu'"),
        ("auto:4", "gpu", "only 3 qualify"),
        ("cpu", "gpu", "device_ids='cpu' with trainer.accelerator=gpu: the two disagree"),
    ],
)
def test_bad_requests_name_the_request_and_the_fix(
    fake_gpus: Callable[..., list[GPUInfo]], request_: object, accelerator: str, message: str
) -> None:
    fake_gpus(10, 40, 0.5, 30)
    with pytest.raises(DeviceSelectionError, match=message):
        resolve_devices(request_, accelerator)  # type: ignore[arg-type]


def test_gpus_without_cuda_suggest_the_cpu(fake_gpus: Callable[..., list[GPUInfo]]) -> None:
    fake_gpus()
    with pytest.raises(DeviceSelectionError, match=r"trainer\.accelerator=cpu") as info:
        resolve_devices([0, 3])
    assert "[0, 3]" in str(info.value)
    with pytest.raises(DeviceSelectionError, match="no CUDA device is visible"):
        resolve_devices(2, "gpu")
    assert [str(d) for d in resolve_devices(2).devices] == ["cpu", "cpu"]  # a count is device-agnostic


def test_error_explains_cuda_visible_devices(
    fake_gpus: Callable[..., list[GPUInfo]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus(10, 10)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,5")
    with pytest.raises(DeviceSelectionError, match=r"CUDA_VISIBLE_DEVICES='2,5' is set.*count from 0"):
        resolve_devices([5])


def test_auto_honours_the_minimum_free_memory(fake_gpus: Callable[..., list[GPUInfo]]) -> None:
    fake_gpus(10, 40, 0.5, 30)
    assert resolve_devices("auto", min_free_memory="20GiB").trainer_devices == [1, 3]
    with pytest.raises(DeviceSelectionError, match=r"no GPU with at least 50\.0 GiB free"):
        resolve_devices("auto", min_free_memory="50GiB")


def test_auto_takes_the_gpus_the_launching_rank_handed_down(
    fake_gpus: Callable[..., list[GPUInfo]], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus(10, 40, 0.5, 30)
    monkeypatch.setenv(AUTO_IDS_ENV, "3,0")
    assert resolve_devices("auto").trainer_devices == [3, 0]
    assert resolve_devices("auto:2").trainer_devices == [3, 0]


@pytest.mark.parametrize(
    ("launched", "request_", "message"),
    [
        (
            "1,3",
            "auto:3",
            r"chose 2 GPUs \[1, 3\] \(LIGHTNING_GPUPAR_AUTO_DEVICE_IDS\), but this rank asks for 3\.",
        ),
        ("1,4,6", "auto", r"chose GPUs \[1, 4, 6\] .*sees only 4 \(ids 0\.\.3\), not \[4, 6\]\."),
        ("1,x", "auto", r"LIGHTNING_GPUPAR_AUTO_DEVICE_IDS='1,x' is not a comma-separated list"),
        ("", "auto:2", r"LIGHTNING_GPUPAR_AUTO_DEVICE_IDS='' is not a comma-separated list"),
    ],
    ids=["count-mismatch", "unseen-ids", "not-ints", "empty"],
)
def test_a_bad_hand_off_from_the_launching_rank_says_what_is_wrong(
    fake_gpus: Callable[..., list[GPUInfo]],
    monkeypatch: pytest.MonkeyPatch,
    launched: str,
    request_: str,
    message: str,
) -> None:
    fake_gpus(10, 40, 0.5, 30)
    monkeypatch.setenv(AUTO_IDS_ENV, launched)
    with pytest.raises(DeviceSelectionError, match=message) as info:
        resolve_devices(request_)
    assert "None" not in str(info.value) and "strategy.device_ids" in str(info.value)


def test_auto_outside_slurm_does_not_warn_that_srun_is_unused(
    fake_gpus: Callable[..., list[GPUInfo]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    srun = tmp_path / "srun"
    srun.write_text("#!/bin/sh\n")
    srun.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    for name in [n for n in os.environ if n.startswith("SLURM_")]:
        monkeypatch.delenv(name)
    fake_gpus(10, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Lightning's "`srun` command is available ... but is not used"
        assert resolve_devices("auto").trainer_devices == [1, 0]


def test_auto_select_orders_by_free_memory() -> None:
    gpus = [GPUInfo(i, "x", 80 * GiB, free * GiB) for i, free in enumerate([5, 7, 6])]
    assert auto_select(gpus, 0) == [1, 2, 0]
    assert auto_select(gpus, 6 * GiB, count=1) == [1]


@pytest.mark.parametrize(
    ("text", "value"),
    [("10GiB", 10 * GiB), ("1.5GB", 1_500_000_000), ("512", 512), (7, 7), ("2 MiB", 2 << 20)],
)
def test_parse_bytes(text: str | int, value: int) -> None:
    assert parse_bytes(text) == value


def test_parse_bytes_rejects_unknown_units() -> None:
    with pytest.raises(ValueError, match="10GiB"):
        parse_bytes("10 parsecs")


def test_real_machine_resolves_a_cpu_count() -> None:
    selection = resolve_devices(2, "cpu")
    assert selection.devices == (torch.device("cpu"), torch.device("cpu"))
