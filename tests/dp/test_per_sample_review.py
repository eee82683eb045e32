"""Review of the per-sample list rule (dp/batch.py ``sequence_role``) on a detection-style batch: images and a
list with one box tensor per image, as torchvision's detection examples collate them. Each replica must see
every image with its own boxes, whatever the number of boxes per image. Also: a loss that is a mean over
labelled samples only (``ignore_index``) under dp (xfail)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from tests.helpers.trainer import TRAINING_ONLY
from tests.model_split.test_model_split import assert_same_training, fit
from tests.model_split.test_one_f_one_b_review import IgnoringNet


class PairingNet(pl.LightningModule):
    """Records, per sample, its id as the image says it and as its boxes say it."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 1)
        self.pairs: list[tuple[int, list[int]]] = []

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, boxes = batch
        assert len(boxes) == len(images), f"{len(images)} images beside {len(boxes)} box tensors"
        for image, box in zip(images, boxes, strict=True):
            self.pairs.append((int(image[0]), sorted({int(v) for v in box.flatten()})))
        return self.layer(images).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def detection_loader(boxes_per_image: list[int]) -> DataLoader[Any]:
    samples = [
        (torch.full((2,), float(i)), torch.full((k, 4), float(i))) for i, k in enumerate(boxes_per_image)
    ]

    def collate(items: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, list[Tensor]]:
        return torch.stack([image for image, _ in items]), [box for _, box in items]

    return DataLoader(samples, batch_size=4, collate_fn=collate)  # type: ignore[arg-type]


def pairs_under(strategy: str, devices: int, boxes_per_image: list[int]) -> list[tuple[int, list[int]]]:
    module = PairingNet()
    trainer = pl.Trainer(**TRAINING_ONLY, accelerator="cpu", strategy=strategy, devices=devices, max_epochs=1)
    trainer.fit(module, detection_loader(boxes_per_image))
    return sorted(module.pairs)


def test_boxes_of_varied_counts_stay_with_their_images() -> None:
    counts = [1, 3, 2, 5, 2, 2, 1, 3]
    assert pairs_under("dp", 2, counts) == pairs_under("auto", 1, counts) == [(i, [i]) for i in range(8)]


@pytest.mark.xfail(
    strict=True,
    reason="dp splits a list of n box tensors that each happen to hold n boxes (n = batch size) as a record: "
    "each box tensor is cut along dim 0 and every replica pairs its images with slices of all images' boxes, "
    "silently (sequence_role reads 'all items are batches of n' as [x, y]); the same loader is split "
    "correctly when the counts vary, so the result depends on the data",
)
def test_boxes_whose_count_equals_the_batch_size_stay_with_their_images() -> None:
    counts = [4, 4, 4, 4, 1, 3, 2, 5]  # the first batch: every image has batch-size (4) boxes
    assert pairs_under("dp", 2, counts) == pairs_under("auto", 1, counts) == [(i, [i]) for i in range(8)]


@pytest.mark.xfail(
    strict=True,
    reason="dp weighs each replica's loss by its shard's share of the samples, so a loss that is a mean over "
    "labelled samples or tokens only (cross_entropy with ignore_index=-100: language models with padding) "
    "trains silently on other gradients than one device, and a shard with no label gives a NaN loss (0/0) "
    "that poisons the step; docs/dp.md says loss and gradients equal one device without this caveat",
)
def test_a_loss_over_labelled_samples_only_equals_one_device() -> None:
    single, dp = IgnoringNet(), IgnoringNet()
    fit(single)
    fit(dp, "dp", devices=2)
    assert_same_training(single, dp)
