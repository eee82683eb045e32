"""``schedule="1f1b"`` in a Trainer: training equals one device, logs and hooks keep their meaning, and what
cannot work is refused before training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from omegaconf import DictConfig
from torch import Tensor

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.config import build_trainer
from lightning_gpupar.model_split import PlacementError
from lightning_gpupar.model_split.pipeline import PipelineError
from tests.model_split.test_model_split import MAP, TokenNet, assert_same_training, fit
from tests.model_split.test_one_f_one_b import one_thread  # noqa: F401  (autouse)

MAP3 = {"model.embed": 0, "model.blocks.0-1": 1, "model.blocks.2-3": 2, "model.head": 2}


class LoggingNet(TokenNet):
    """Logs its loss and counts the backward hooks, with the loss each one saw."""

    def __init__(self) -> None:
        super().__init__()
        self.hooks: list[tuple[str, float | None]] = []
        self.logged: list[dict[str, float]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        return loss

    def on_before_backward(self, loss: Tensor) -> None:
        self.hooks.append(("before", float(loss.detach())))

    def on_after_backward(self) -> None:
        self.hooks.append(("after", None))

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        self.logged.append({k: float(v) for k, v in self.trainer.callback_metrics.items()})


@pytest.fixture(scope="module")
def single() -> LoggingNet:
    module = LoggingNet()
    fit(module)
    return module


@pytest.mark.parametrize(("placement", "devices", "chunks"), [(MAP, 2, 4), (MAP3, 3, 3), (MAP3, 3, 8)])
def test_one_f_one_b_training_equals_single_device(
    single: LoggingNet, placement: dict[str, int], devices: int, chunks: int
) -> None:
    # batches of 10, 10, 5 (uneven micro-batches; fewer samples than chunks in the last); clipped, momentum
    split = LoggingNet()
    steps: list[int] = []
    split.model.head.register_forward_hook(lambda m, a, o: steps.append(len(o)))
    fit(split, ModelSplitStrategy(placement, chunks=chunks, schedule="1f1b"), devices=devices)
    assert_same_training(single, split)
    assert len(steps) == 1 + sum(min(chunks, n) for n in (10, 10, 5))  # once per micro-batch (+ chain check)
    # the logged step loss is the batch's mean loss; the epoch mean weighs batches as unsplit
    for ours, theirs in zip(split.logged, single.logged, strict=True):
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-10), key
    assert [h[0] for h in split.hooks] == [h[0] for h in single.hooks] == ["before", "after"] * 3
    before = [h[1] for h in split.hooks if h[1] is not None]
    assert before == pytest.approx([h[1] for h in single.hooks if h[1] is not None], rel=1e-10)  # mean loss


def test_gradient_accumulation_equals_single_device() -> None:
    reference, split = TokenNet(), TokenNet()
    fit(reference, accumulate_grad_batches=2, max_steps=2, samples=40)
    fit(
        split,
        ModelSplitStrategy(MAP, chunks=3, schedule="1f1b"),
        2,
        accumulate_grad_batches=2,
        max_steps=2,
        samples=40,
    )
    assert len(reference.grads) == len(split.grads) == 2
    for ga, gb in zip(reference.grads, split.grads, strict=True):
        for key in ga:
            torch.testing.assert_close(gb[key], ga[key], rtol=1e-10, atol=1e-12, msg=key)


def test_an_unknown_schedule_is_refused() -> None:
    with pytest.raises(PlacementError, match=r"schedule='zero-bubble'.*'gpipe', '1f1b'"):
        ModelSplitStrategy(MAP, chunks=2, schedule="zero-bubble")


class Manual(TokenNet):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False


class OwnBackward(TokenNet):
    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        loss.backward()


@pytest.mark.parametrize(("module", "message"), [(Manual, "manual optimization"), (OwnBackward, "overrides")])
def test_what_cannot_work_is_refused_before_the_first_step(module: type[TokenNet], message: str) -> None:
    net = module()
    with pytest.raises(PipelineError, match=message):
        fit(net, ModelSplitStrategy(MAP, chunks=2, schedule="1f1b"), devices=2, gradient_clip_val=None)
    assert not net.losses


class Extra(TokenNet):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return {"loss": super().training_step(batch, batch_idx), "logits": None}


class Skips(TokenNet):
    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return None


@pytest.mark.parametrize(("module", "message"), [(Extra, r"\['logits'\]"), (Skips, "NoneType")])
def test_a_step_without_a_plain_loss_is_refused(module: type[TokenNet], message: str) -> None:
    with pytest.raises(PipelineError, match=message):
        fit(module(), ModelSplitStrategy(MAP, chunks=2, schedule="1f1b"), devices=2)


def test_hydra_config_selects_the_schedule(compose_app: Callable[..., DictConfig]) -> None:
    cfg = compose_app(
        "strategy=model_split", "strategy.chunks=4", "strategy.schedule=1f1b", "trainer.accelerator=cpu"
    )
    strategy = build_trainer(cfg, logger=False).strategy
    assert isinstance(strategy, ModelSplitStrategy) and strategy.split.schedule == "1f1b"
    assert compose_app("strategy=ddp_split").strategy.schedule == "gpipe"
