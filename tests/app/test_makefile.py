"""The Makefile's install step: pinned torch first, from TORCH_INDEX when one is given."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[2]
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def install_commands(*variables: str) -> list[str]:
    """The commands `make` would run to set up .venv (-n: printed, not run; -B: as on a fresh clone)."""
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    done = subprocess.run(
        ["make", "-n", "-B", ".venv/.installed-stamp", *variables],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in done.stdout.splitlines() if " pip install " in line]


def test_by_default_torch_comes_from_pips_own_indexes() -> None:
    torch_step, package_step = install_commands()[-2:]
    assert torch_step.split()[-3:] == ["-c", "constraints.txt", "torch"]
    assert "--index-url" not in torch_step and "--index-url" not in package_step


def test_torch_index_reaches_the_torch_step_only() -> None:
    torch_step, package_step = install_commands(f"TORCH_INDEX={CPU_INDEX}")[-2:]
    assert f"-c constraints.txt --index-url {CPU_INDEX} torch" in torch_step
    assert "--index-url" not in package_step and "-c constraints.txt" in package_step


def test_the_torch_pin_accepts_the_cpu_indexs_local_version() -> None:
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines() if line.startswith("torch")]
    (pin,) = pins
    version = pin.removeprefix("torch==")
    assert SpecifierSet(pin.removeprefix("torch")).contains(f"{version}+cpu")
