"""strategy="dp" on CUDA: what needs distinct GPUs or CUDA autocast (skipped without CUDA).

The CPU tests in test_dp.py that take the `device_type` fixture run again on CUDA by themselves.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_gpupar import DataParallelStrategy
from tests.helpers.dp_models import LoggingNet, ManualNet
from tests.helpers.equivalence import ProbeNet, TinyNet, assert_same, run
from tests.helpers.markers import requires_cuda

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


def test_metrics_updated_on_two_gpus_merge_and_equal_single_device() -> None:
    kwargs = dict(batch_size=7, n=35, max_steps=-1, max_epochs=1, limit_val_batches=None)
    single = run(LoggingNet(), devices=1, **kwargs)  # type: ignore[arg-type]
    parallel = run(LoggingNet(), **cuda_dp(2), **kwargs)  # type: ignore[arg-type]
    assert parallel.metrics["count"] == single.metrics["count"] == 7
    for key in ("acc_step", "train_acc", "loss_mean", "largest", "smallest", "val_acc", "val_loss"):
        assert parallel.metrics[key] == pytest.approx(single.metrics[key], rel=1e-10), key


def test_a_manual_step_gets_its_batch_and_forward_outputs_on_the_output_device() -> None:
    devices = cuda_dp(2)["devices"]
    seen: list[tuple[torch.device, torch.device, torch.device]] = []

    class Net(ManualNet):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)  # data-parallel, gathered on output_device
            direct = self.model(x.to(self.device))  # a direct submodule call runs on the root device
            seen.append((x.device, logits.device, direct.device))
            direct_loss = F.cross_entropy(direct, y.to(self.device)).to(logits.device)
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(F.cross_entropy(logits, y) + direct_loss)
            optimizer.step()  # type: ignore[union-attr]

    strategy = DataParallelStrategy(output_device=1)
    run(Net(), max_steps=2, accelerator="gpu", devices=devices, strategy=strategy)
    cuda0, cuda1 = torch.device("cuda", 0), torch.device("cuda", 1)
    assert seen == [(cuda1, cuda1, cuda0)] * 2
