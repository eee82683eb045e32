"""The guard in ``tests/conftest.py`` keeps Python subprocesses out of ``make test-fast``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


def test_an_unmarked_test_cannot_start_python() -> None:
    with pytest.raises(AssertionError, match=r"starts a Python subprocess .*mark it @pytest.mark.slow"):
        subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_an_unmarked_test_may_run_a_small_tool() -> None:
    assert subprocess.run(["true"], check=False).returncode == 0


@pytest.mark.slow
def test_a_slow_test_may_start_python() -> None:
    done = subprocess.run([sys.executable, "-c", "print(6 * 7)"], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "42"


def test_a_librarys_own_python_workers_are_its_business() -> None:
    """A Python child started by code outside the repository (here a code object named after a file in
    the venv, as torch.compile's worker pool would be) is allowed."""
    library_file = str(Path(sys.prefix) / "lib" / "somelibrary.py")
    code = compile("subprocess.run([sys.executable, '-c', 'pass'], check=True)", library_file, "exec")
    exec(code, {"subprocess": subprocess, "sys": sys})
