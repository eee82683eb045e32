"""dp on two distinct GPUs: the broadcast and reduce paths ``[cuda:0, cuda:0]`` never takes (skipped below
two GPUs), and autocast on a float32 model, where activations really change dtype."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_gpupar import DataParallelStrategy
from tests.helpers.dp_models import BatchNormNet
from tests.helpers.equivalence import TinyNet, assert_same, make_data, run
from tests.helpers.markers import requires_cuda

pytestmark = [pytest.mark.cuda, requires_cuda]

TWO = [0, 1]


@pytest.fixture(autouse=True)
def _two_gpus() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, found {torch.cuda.device_count()}")


def test_batchnorm_running_statistics_are_the_first_replicas() -> None:
    module, reference = BatchNormNet(), BatchNormNet()
    run(module, batch_size=8, max_steps=1, accelerator="gpu", strategy="dp", devices=TWO)
    x = make_data(64).tensors[0][:8]
    reference.model[1](reference.model[0](x[:4]))  # the first replica's shard, on one device
    torch.testing.assert_close(module.model[1].running_mean.cpu(), reference.model[1].running_mean)
    torch.testing.assert_close(module.model[1].running_var.cpu(), reference.model[1].running_var)


def test_validation_and_predict_without_grad_equal_one_device() -> None:
    kwargs: dict[str, Any] = dict(batch_size=7, n=35, max_steps=2, limit_val_batches=None, predict=True)
    single = run(TinyNet(), devices=1, **kwargs)
    parallel = run(TinyNet(), accelerator="gpu", strategy="dp", devices=TWO, **kwargs)
    assert parallel.metrics["val_loss"] == pytest.approx(single.metrics["val_loss"], rel=1e-10)
    assert single.predictions is not None and parallel.predictions is not None
    torch.testing.assert_close(parallel.predictions.cpu(), single.predictions, rtol=1e-10, atol=1e-12)
    assert_same(parallel.weights, single.weights)


class Float32Net(TinyNet):
    """A float32 model recording, in each replica, the dtype of its first layer's activations."""

    def __init__(self) -> None:
        super().__init__()
        self.model = self.model.float()
        self.seen: list[tuple[torch.device, torch.dtype]] = []
        self.lock = threading.Lock()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        hidden = self.model[0](x.float())
        with self.lock:
            self.seen.append((hidden.device, hidden.dtype))
        return F.cross_entropy(self.model[2](self.model[1](hidden)).float(), y)


@pytest.mark.parametrize(
    ("precision", "dtype"), [("bf16-mixed", torch.bfloat16), ("16-mixed", torch.float16)]
)
def test_autocast_casts_a_float32_models_activations_in_every_replica(
    precision: str, dtype: torch.dtype
) -> None:
    module = Float32Net()
    run(module, precision=precision, max_steps=2, accelerator="gpu", strategy="dp", devices=TWO)
    assert sorted(module.seen, key=str) == sorted(
        [(torch.device("cuda", i), dtype) for i in TWO] * 2, key=str
    )


def test_16_mixed_with_output_device_1_trains_like_one_gpu() -> None:
    """fp16 with a GradScaler, outputs and the loss gathered on cuda:1."""
    losses_on: list[torch.device] = []

    class Net(Float32Net):
        def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
            losses_on.append(outputs["loss"].device)
            super().on_train_batch_end(outputs, batch, batch_idx)

    single = run(Float32Net(), precision="16-mixed", max_steps=4, accelerator="gpu", devices=[0])
    strategy = DataParallelStrategy(output_device=1)
    parallel = run(
        Net(), precision="16-mixed", max_steps=4, accelerator="gpu", devices=TWO, strategy=strategy
    )
    assert losses_on == [torch.device("cuda", 1)] * 4
    torch.testing.assert_close(
        torch.tensor(parallel.losses), torch.tensor(single.losses), rtol=2e-3, atol=2e-3
    )
    for key, weight in single.weights.items():
        torch.testing.assert_close(parallel.weights[key], weight, rtol=1e-2, atol=1e-3)
