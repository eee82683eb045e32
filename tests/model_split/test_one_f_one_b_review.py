"""Review of ``schedule="1f1b"`` with ordinary logging idioms: a step value logged with ``reduce_fx`` "sum",
"max" or "min" is the whole batch's, as on one device (micro-batch values combined by that reduction)."""

from __future__ import annotations

from typing import Any

import pytest
from torch import Tensor

from lightning_gpupar import ModelSplitStrategy
from tests.model_split.test_model_split import MAP, TokenNet, fit
from tests.model_split.test_one_f_one_b import one_thread  # noqa: F401  (autouse)


class ReducingNet(TokenNet):
    """Logs per-step sums, maxima and minima of its batch, and records the step values Lightning logged."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        tokens, labels = batch
        self.log("samples", float(len(tokens)), reduce_fx="sum", on_step=True, on_epoch=False)
        self.log("label_max", labels.max().double(), reduce_fx="max", on_step=True, on_epoch=False)
        self.log("label_min", labels.min().double(), reduce_fx="min", on_step=True, on_epoch=False)
        return super().training_step(batch, batch_idx)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.logged.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})


def test_one_f_one_b_logs_sum_max_min_as_one_device() -> None:
    single, split = ReducingNet(), ReducingNet()
    fit(single)
    fit(split, ModelSplitStrategy(MAP, chunks=4, schedule="1f1b"), devices=2)
    assert [s["samples"] for s in single.logged] == [10, 10, 5]
    for ours, theirs in zip(split.logged, single.logged, strict=True):
        assert ours == pytest.approx(theirs)
