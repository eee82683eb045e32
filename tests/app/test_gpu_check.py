"""``make gpu-check`` on a machine without GPUs or without a package index: it says so plainly, fails,
and installs nothing; a missing package is named with the commands that bring it to an offline machine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import offline
from tests.conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


def _hide(directory: Path, *modules: str) -> None:
    """Modules in ``directory`` that fail to import as if not installed; a ``pip`` that records a call."""
    directory.mkdir(exist_ok=True)
    for name in modules:
        (directory / f"{name}.py").write_text(
            f"raise ModuleNotFoundError(\"No module named '{name}' (hidden by a test)\", name='{name}')\n"
        )
    (directory / "pip.py").write_text(  # `python -m pip ...` would run this: it must never be called
        f"open({str(directory / 'pip-was-called')!r}, 'w').close()\nraise SystemExit(99)\n"
    )


@pytest.mark.slow
def test_without_a_gpu_or_an_index_it_says_so_and_exits_non_zero_installing_nothing(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    _hide(hidden, "hydra", "omegaconf", "antlr4")
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT)]),
        "PIP_INDEX_URL": "http://127.0.0.1:9/simple",  # no index: nothing could be downloaded
        "PIP_NO_INDEX": "1",
    }
    env.pop("OUT", None)
    done = subprocess.run([sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "found no CUDA GPU" in done.stdout and "nothing to check" in done.stdout
    assert "Nothing was installed" in done.stdout
    assert "Traceback" not in done.stderr
    assert not (hidden / "pip-was-called").exists()
    assert "pip wheel --no-deps -w gpu-check-wheels antlr4-python3-runtime==4.9.3" in done.stdout
    install = "--no-index --find-links gpu-check-wheels hydra-core omegaconf antlr4-python3-runtime"
    assert install in done.stdout


@pytest.mark.slow
def test_without_hydra_the_tests_collect_and_only_hydra_tests_skip(tmp_path: Path) -> None:
    hidden = tmp_path / "hidden"
    _hide(hidden, "hydra", "omegaconf")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hidden), str(ROOT)])}
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider"]
    command += ["-p", "no:hydra_pytest", "tests"]  # (hydra-core's pytest plugin is gone with it)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "needs hydra (hydra-core, omegaconf)" in done.stdout
    assert "tests/model_split/test_pipeline.py::" in done.stdout  # (a module with CUDA tests)
    assert "tests/model_split/test_model_split.py::" in done.stdout  # Hydra tests inside skip one by one


def test_make_gpu_check_runs_the_script_and_installs_nothing() -> None:
    # --no-print-directory: under `make test` this make is a sub-make, which would add "Leaving directory"
    for extra in ([], ["PY=python3"]):
        done = subprocess.run(
            ["make", "-n", "--no-print-directory", "gpu-check", *extra],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "benchmarks/gpu_check.py" in done.stdout.splitlines()[-1]
        assert "pip " not in done.stdout and "-m venv" not in done.stdout  # runs .venv's python if any
    assert done.stdout.splitlines()[-1].startswith("python3 ")


def test_wheelhouse_instructions_for_missing_packages() -> None:
    missing = [
        offline.Missing("hydra", "hydra-core", False, ""),
        offline.Missing("antlr4", "antlr4-python3-runtime", False, ""),
        offline.Missing("yaml", "PyYAML", False, ""),
    ]
    text = offline.wheelhouse_instructions(missing, python="/usr/bin/python3")
    assert "pip download --no-deps --only-binary=:all: -d gpu-check-wheels hydra-core==1.3.8" in text
    assert "pip wheel --no-deps -w gpu-check-wheels antlr4-python3-runtime==4.9.3" in text
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"--python-version {version} --platform manylinux2014_" in text and "PyYAML==6.0.4" in text
    assert text.splitlines()[-1] == (
        "    /usr/bin/python3 -m pip install --no-index --find-links gpu-check-wheels "
        "hydra-core antlr4-python3-runtime PyYAML"
    )
