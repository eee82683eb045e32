"""strategy="dp" on CUDA: the CPU equivalence tests again on GPUs (skipped without CUDA)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tests.conftest import requires_cuda
from tests.equivalence import ProbeNet, TinyNet, assert_same, run

pytestmark = [pytest.mark.cuda, requires_cuda]


def cuda_dp(n: int) -> dict[str, Any]:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs, found {torch.cuda.device_count()}")
    return {"accelerator": "gpu", "strategy": "dp", "devices": list(range(n))}


def test_single_gpu_dp_equals_single_device() -> None:
    single = run(TinyNet(), batch_size=7, n=35, max_steps=3, devices=1)
    gpu = run(TinyNet(), batch_size=7, n=35, max_steps=3, accelerator="gpu", strategy="dp", devices=[0])
    torch.testing.assert_close(gpu.losses, single.losses, rtol=1e-10, atol=0)
    assert_same(gpu.weights, single.weights)


@pytest.mark.parametrize("devices", [2, 3])
def test_multi_gpu_dp_equals_single_device(devices: int) -> None:
    kwargs = cuda_dp(devices)
    single = run(TinyNet(), batch_size=7, n=35, max_steps=3, devices=1)
    parallel = run(TinyNet(), batch_size=7, n=35, max_steps=3, **kwargs)
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-10, atol=0)
    assert_same(parallel.weights, single.weights)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_autocast_reaches_every_gpu_replica(precision: str) -> None:
    kwargs = cuda_dp(2)
    module = ProbeNet(device_type="cuda")
    run(module, precision=precision, max_steps=1, **kwargs)
    expected = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    assert len(module.seen) == 2
    assert all(autocast and dtype == expected for _, _, autocast, dtype in module.seen)
    assert {device for _, device, _, _ in module.seen} == {torch.device("cuda", 0), torch.device("cuda", 1)}
