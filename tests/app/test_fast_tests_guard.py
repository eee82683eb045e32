"""The guard in ``tests/conftest.py`` keeps Python subprocesses out of ``make test-fast``."""

from __future__ import annotations

import subprocess
import sys

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
