"""dp runs each shard's ``transfer_batch_to_device`` / ``on_after_batch_transfer`` on its device: on the
shard's replica (its ``self.device``, parameters and buffers) with that device current (suspicion 3)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
from torch import Tensor

from tests.helpers.equivalence import TinyNet, assert_same, run
from tests.helpers.markers import requires_cuda


class ShardStateNet(TinyNet):
    """The transfer hook leaves state on ``self`` that the same shard's step reads."""

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[int, int]] = []
        self.lock = threading.Lock()

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.rows_transferred = len(batch[0])
        return batch

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        with self.lock:
            self.pairs.append((self.rows_transferred, len(batch[0])))
        return super().training_step(batch, batch_idx)


def test_a_shards_hook_runs_on_the_replica_that_runs_its_step() -> None:
    module = ShardStateNet()
    run(module, batch_size=7, n=7, max_steps=1, accelerator="cpu", strategy="dp", devices=3)  # 3, 2, 2
    assert sorted(module.pairs) == [(2, 2), (2, 2), (3, 3)]


class CenteringNet(TinyNet):
    """``x - self.mean`` in the hook: a buffer of the module meets the shard on the shard's device."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.full((6,), 0.25, dtype=torch.float64))
        self.hook_devices: list[tuple[torch.device, torch.device, int]] = []

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        self.hook_devices.append((x.device, self.device, torch.cuda.current_device()))
        return x - self.mean, y


@pytest.mark.cuda
@requires_cuda
def test_a_hook_using_a_buffer_runs_on_each_shards_gpu() -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    single = run(CenteringNet(), batch_size=7, n=21, max_steps=3, devices=1)
    module = CenteringNet()
    parallel = run(module, batch_size=7, n=21, max_steps=3, accelerator="gpu", strategy="dp", devices=[0, 1])
    torch.testing.assert_close(parallel.losses, single.losses, rtol=1e-10, atol=0)
    assert_same(parallel.weights, single.weights)
    cuda = [torch.device("cuda", i) for i in (0, 1)]
    assert module.hook_devices == [(cuda[0], cuda[0], 0), (cuda[1], cuda[1], 1)] * 3
