"""A Hydra sweep's later jobs start their ranks with the CUDA_DEVICE_ORDER rank 0 started with (suspicion 6).

Lightning's ``CUDAAccelerator.setup`` sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` in rank 0 after its CUDA
numbering is fixed; children of the next job must not inherit it. Processes are mocked (no child starts).
"""

from __future__ import annotations

import subprocess
from typing import Any

import pytest
from lightning.fabric.plugins.environments import LightningEnvironment

from lightning_gpupar.ddp import launcher as launchers
from lightning_gpupar.ddp.launcher import DDP_ENV_KEYS, HydraAwareScriptLauncher


class FakeChild:
    def __init__(self, command: list[str], env: dict[str, str], cwd: str | None = None) -> None:
        self.env = env

    def poll(self) -> int:
        return 0

    def wait(self, timeout: float | None = None) -> int:
        return 0


@pytest.mark.parametrize("user_order", [None, "FASTEST_FIRST"])
def test_each_jobs_children_get_the_order_rank_0_started_with(
    monkeypatch: pytest.MonkeyPatch, user_order: str | None
) -> None:
    for key in (*DDP_ENV_KEYS, "CUDA_DEVICE_ORDER"):
        monkeypatch.setenv(key, "")  # so that monkeypatch restores it, whatever the launcher sets
        monkeypatch.delenv(key)
    if user_order is not None:
        monkeypatch.setenv("CUDA_DEVICE_ORDER", user_order)
    monkeypatch.setenv("MASTER_PORT", "29431")
    monkeypatch.setattr(launchers, "_previous_launch", None)
    monkeypatch.setattr(launchers, "_require_free_port", lambda port: None)
    children: list[FakeChild] = []

    def spawn(*args: Any, **kwargs: Any) -> FakeChild:
        children.append(FakeChild(*args, **kwargs))
        return children[-1]

    monkeypatch.setattr(subprocess, "Popen", spawn)

    for job in ("sweep/0", "sweep/1", "sweep/2"):
        monkeypatch.setattr(launchers, "_hydra_job_dir", lambda job=job: job)
        launchers._retire_previous_job()  # what launch() does first
        launcher = HydraAwareScriptLauncher(LightningEnvironment(), num_processes=2, num_nodes=1)
        launcher._call_children_scripts()
        monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # Lightning's CUDAAccelerator.setup in rank 0
    orders: list[Any] = [child.env.get("CUDA_DEVICE_ORDER") for child in children]
    assert orders == [user_order] * 3
    launchers._retire_previous_job()
