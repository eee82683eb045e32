"""dp's multi-GPU behaviours on one GPU (issue 23): the replicas on ``[cuda:0, cuda:0]``, and a GPU and the
CPU ``[cuda:0, cpu]``, so a machine with one GPU decides them. The two-GPU versions stay in
test_dp_two_gpus.py / test_dp_cuda.py (there the broadcast/reduce path of distinct GPUs runs too)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from lightning_gpupar import DataParallelStrategy
from tests.dp.test_dp_shard_hooks import CenteringNet
from tests.dp.test_dp_two_gpus import Float32Net
from tests.helpers.dp_models import LoggingNet, ManualNet
from tests.helpers.equivalence import TinyNet, assert_same, run
from tests.helpers.markers import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

GPU0, CPU = torch.device("cuda", 0), torch.device("cpu")


def twice(output_device: int | None = None) -> dict[str, Any]:
    """Trainer arguments: dp with two replicas on cuda:0."""
    strategy = DataParallelStrategy(parallel_devices=[GPU0, GPU0], output_device=output_device)
    return {"accelerator": "gpu", "strategy": strategy}


def test_two_replicas_on_one_gpu_equal_single_device() -> None:
    single = run(TinyNet(), batch_size=7, n=35, max_steps=3, devices=1)
    parallel = run(TinyNet(), batch_size=7, n=35, max_steps=3, **twice())
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-9, atol=1e-12)
    assert_same({k: v.cpu() for k, v in parallel.weights.items()}, single.weights)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)]
)
def test_autocast_reaches_both_replicas_on_one_gpu(precision: str, dtype: torch.dtype) -> None:
    module = Float32Net()
    run(module, precision=precision, max_steps=2, **twice())
    assert module.seen == [(GPU0, dtype)] * 4


def test_16_mixed_grad_scaler_with_output_device_trains_like_one_gpu() -> None:
    single = run(Float32Net(), precision="16-mixed", max_steps=4, accelerator="gpu", devices=[0])
    parallel = run(Float32Net(), precision="16-mixed", max_steps=4, **twice(output_device=1))
    torch.testing.assert_close(
        torch.tensor(parallel.losses), torch.tensor(single.losses), rtol=2e-3, atol=2e-3
    )
    for key, weight in single.weights.items():
        torch.testing.assert_close(parallel.weights[key], weight, rtol=1e-2, atol=1e-3)


def test_metrics_of_two_replicas_on_one_gpu_merge_and_equal_single_device() -> None:
    kwargs: dict[str, Any] = dict(batch_size=7, n=35, max_steps=-1, max_epochs=1, limit_val_batches=None)
    single = run(LoggingNet(), devices=1, **kwargs)
    parallel = run(LoggingNet(), **twice(), **kwargs)
    assert parallel.metrics["count"] == single.metrics["count"] == 7
    for key in ("acc_step", "train_acc", "loss_mean", "largest", "smallest", "val_acc", "val_loss"):
        assert parallel.metrics[key] == pytest.approx(single.metrics[key], rel=1e-9), key


def test_a_manual_step_on_one_gpu_twice_gets_its_outputs_on_the_output_device() -> None:
    seen: list[tuple[torch.device, torch.device]] = []

    class Net(ManualNet):
        def training_step(self, batch: Any, batch_idx: int) -> None:
            x, y = batch
            logits = self(x)
            seen.append((x.device, logits.device))
            optimizer = self.optimizers()
            optimizer.zero_grad()  # type: ignore[union-attr]
            self.manual_backward(F.cross_entropy(logits, y))
            optimizer.step()  # type: ignore[union-attr]

    run(Net(), max_steps=2, **twice(output_device=1))
    assert seen == [(GPU0, GPU0)] * 2


def test_a_hook_using_a_buffer_runs_on_each_shards_device_gpu_and_cpu() -> None:
    single = run(CenteringNet(), batch_size=7, n=21, max_steps=3, devices=1)
    module = CenteringNet()
    strategy = DataParallelStrategy(parallel_devices=[GPU0, CPU])
    parallel = run(module, batch_size=7, n=21, max_steps=3, accelerator="gpu", strategy=strategy)
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-9, atol=1e-12)
    for key, weight in single.weights.items():
        torch.testing.assert_close(parallel.weights[key].cpu(), weight, rtol=1e-9, atol=1e-12)
    assert [(x, d) for x, d, _ in module.hook_devices] == [(GPU0, GPU0), (CPU, CPU)] * 3
