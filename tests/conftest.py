"""Shared fixtures: mocked CUDA inventories and Hydra composition of the example app.

Hydra (hydra-core, omegaconf) is imported lazily: on a machine without it (the GPU machine of
``make gpu-check``), the test modules that need it are skipped with a reason, and every other test runs.
"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import lightning.fabric.accelerators.cuda
import lightning.pytorch.accelerators.cuda
import pytest
import torch

from lightning_gpupar.devices import GPUInfo
from lightning_gpupar.devices import requests as devices
from tests.helpers.markers import GiB

ROOT = Path(__file__).resolve().parents[1]


def _missing(*modules: str) -> str | None:
    """The first of ``modules`` that cannot be imported."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None


#: What the Hydra tests need and is not installed (None: all of it is).
HYDRA_MISSING = _missing("hydra", "omegaconf")


@pytest.hookimpl(tryfirst=True)
def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    """Without Hydra, a test module whose import needs it is skipped with the reason, not an error."""
    if HYDRA_MISSING is None:
        return None
    return _HydraOptionalModule.from_parent(parent, path=module_path)


class _HydraOptionalModule(pytest.Module):
    def _getobj(self) -> Any:
        try:
            return super()._getobj()
        except self.CollectError as err:
            if not re.search(r"No module named '(hydra|omegaconf)'", str(err)):
                raise
            pytest.skip(
                f"needs {HYDRA_MISSING} (hydra-core, omegaconf); `python benchmarks/gpu_check.py` prints how "
                "to install them offline",
                allow_module_level=True,
            )


@pytest.fixture(autouse=True)
def fast_tests_start_no_python(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test not marked ``slow`` may not start a Python interpreter (each costs seconds of imports).

    That keeps ``make test-fast`` (``-m 'not slow'``) the quick edit loop it promises. Only starts from
    this repository's code count (a library's own workers, e.g. torch.compile's, are its business), and
    small system tools (``make -n``, ``mount``) stay allowed.
    """
    if request.node.get_closest_marker("slow"):
        return
    start = subprocess.Popen.__init__

    def guarded(self: subprocess.Popen[Any], args: Any, *rest: Any, **options: Any) -> None:
        program = str(args[0] if isinstance(args, list | tuple) else args).split()[0]
        python = program == sys.executable or Path(program).name.startswith("python")
        if python and _started_by_this_repository():
            raise AssertionError(
                f"{request.node.nodeid} starts a Python subprocess ({program}): mark it @pytest.mark.slow"
            )
        start(self, args, *rest, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


def _started_by_this_repository() -> bool:
    """Whether the code that called into :mod:`subprocess` lives in this repository (not its venv)."""
    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename in (subprocess.__file__, __file__):
        frame = frame.f_back
    if frame is None:
        return False
    caller = Path(frame.f_code.co_filename).resolve()
    return caller.is_relative_to(ROOT) and not caller.is_relative_to(Path(sys.prefix).resolve())


@pytest.fixture
def fake_gpus(monkeypatch: pytest.MonkeyPatch) -> Callable[..., list[GPUInfo]]:
    """Make this process see GPUs with the given free memory (GiB), e.g. ``fake_gpus(10, 40, 2, 40)``.

    Lightning's CUDA checks see them too, so Trainers can be constructed (not run) on them.
    """

    def install(*free_gib: float, total_gib: float = 80) -> list[GPUInfo]:
        gpus = [
            GPUInfo(i, "Fake H100", int(total_gib * GiB), int(free * GiB)) for i, free in enumerate(free_gib)
        ]
        monkeypatch.setattr(devices, "cuda_device_count", lambda: len(gpus))
        monkeypatch.setattr(devices, "query_gpus", lambda: list(gpus))
        if gpus:  # Lightning's own checks, so a Trainer can be built (not run) on the fake GPUs
            monkeypatch.setattr(lightning.fabric.accelerators.cuda, "num_cuda_devices", lambda: len(gpus))
            monkeypatch.setattr(lightning.pytorch.accelerators.cuda, "num_cuda_devices", lambda: len(gpus))
            monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        return gpus

    return install


@pytest.fixture
def compose_app() -> Iterator[Callable[..., Any]]:
    """Compose the example app's config with overrides, as `python examples/train.py ...` would."""
    pytest.importorskip("hydra")
    from hydra import compose, initialize_config_dir

    from examples.schema import register_app_configs

    register_app_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        yield lambda *overrides: compose("config", overrides=list(overrides))
