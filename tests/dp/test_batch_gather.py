"""Splitting nested batches into shards and gathering shard outputs back."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from lightning_gpupar.dp.batch import BatchSplitError, describe, shard_sizes, split_batch
from lightning_gpupar.dp.gather import GatherError, gather_outputs

Pair = namedtuple("Pair", ["inputs", "targets"])


@dataclass
class Sample:
    image: Tensor
    label: Tensor
    source: str


@dataclass(frozen=True)
class Prediction:
    logits: Tensor
    names: list[str]
    model: str = "tiny"


@pytest.mark.parametrize(
    ("total", "parts", "sizes"),
    [(8, 2, [4, 4]), (7, 3, [3, 2, 2]), (2, 3, [1, 1]), (1, 4, [1]), (10, 4, [3, 3, 2, 2])],
)
def test_shards_are_balanced_and_never_empty(total: int, parts: int, sizes: list[int]) -> None:
    assert shard_sizes(total, parts) == sizes


def test_nested_batch_splits_every_tensor_and_shares_the_rest() -> None:
    x = torch.arange(7.0).unsqueeze(1)
    batch = {
        "pair": Pair(x, torch.arange(7)),
        "sample": Sample(x * 2, torch.arange(7), "disk"),
        "ids": [x, "tag"],
    }
    shards, sizes = split_batch(batch, 3)
    assert sizes == [3, 2, 2]
    assert isinstance(shards[1]["pair"], Pair) and isinstance(shards[1]["sample"], Sample)
    assert shards[1]["pair"].targets.tolist() == [3, 4]
    assert shards[2]["sample"].image.squeeze(1).tolist() == [10.0, 12.0]
    assert shards[0]["sample"].source == "disk" and shards[2]["ids"][1] == "tag"
    rebuilt = torch.cat([s["ids"][0] for s in shards])
    assert torch.equal(rebuilt, x)


def test_describe_sketches_the_structure() -> None:
    batch = {"x": torch.zeros(8, 3), "pair": Pair(torch.zeros(8), 5), "tags": ["a"]}
    assert describe(batch) == "dict(x=Tensor[8, 3], pair=Pair(Tensor[8], int), tags=list[str])"


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ({"names": ["a", "b"]}, r"no tensor in it: dict\(names=list\[str, str\]\)"),
        ((torch.zeros(4), torch.zeros(5)), r"disagree on their first \(batch\) dimension \[4, 5\]"),
        ((torch.zeros(4), torch.tensor(1.0)), r"0-dim tensor.*tuple\[Tensor\[4\], Tensor\[\]\]"),
        ({"x": torch.zeros(0, 3)}, r"empty batch \(dim 0 is 0\): dict\(x=Tensor\[0, 3\]\)"),
        ([Prediction(torch.zeros(4, 1), ["a"] * 4)], r"frozen dataclass Prediction.*without frozen=True"),
    ],
)
def test_unsplittable_batches_name_their_structure(batch: object, message: str) -> None:
    with pytest.raises(BatchSplitError, match=message):
        split_batch(batch, 2)


def test_gather_weights_scalars_and_concatenates_per_sample_outputs() -> None:
    cpu = torch.device("cpu")
    outputs = [
        {"loss": torch.tensor(1.0), "preds": torch.tensor([1, 2, 3]), "n": 3, "name": "a"},
        {"loss": torch.tensor(4.0), "preds": torch.tensor([4]), "n": 1, "name": "a"},
    ]
    gathered = gather_outputs(outputs, [3, 1], cpu)
    assert gathered["loss"].item() == pytest.approx((3 * 1.0 + 1 * 4.0) / 4)
    assert gathered["preds"].tolist() == [1, 2, 3, 4]
    assert gathered["n"] == pytest.approx((3 * 3 + 1 * 1) / 4)
    assert gathered["name"] == "a"


def test_gathered_loss_backpropagates_into_every_shard() -> None:
    w = torch.tensor(2.0, requires_grad=True)
    losses = [w * 1.0, w * 3.0]
    gather_outputs(losses, [1, 3], torch.device("cpu")).backward()
    assert w.grad is not None and w.grad.item() == pytest.approx((1 * 1.0 + 3 * 3.0) / 4)


def test_gather_keeps_namedtuples_and_refuses_partial_skips() -> None:
    cpu = torch.device("cpu")
    out = gather_outputs([Pair(torch.ones(2), 1.0), Pair(torch.zeros(1), 4.0)], [2, 1], cpu)
    assert (
        isinstance(out, Pair) and out.inputs.tolist() == [1.0, 1.0, 0.0] and out.targets == pytest.approx(2.0)
    )
    assert gather_outputs([None, None], [1, 1], cpu) is None
    with pytest.raises(RuntimeError, match=r"returned None on replica\(s\) \[1\]"):
        gather_outputs([torch.tensor(1.0), None], [1, 1], cpu)


@pytest.mark.parametrize("sizes", [[3, 2, 2], [2, 2]])
def test_gather_rebuilds_dataclasses_and_concatenates_per_sample_lists(sizes: list[int]) -> None:
    names = [f"s{i}" for i in range(sum(sizes))]
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    outputs = [
        Prediction(torch.arange(float(a), a + n).unsqueeze(1), names[a : a + n])
        for a, n in zip(starts, sizes, strict=True)
    ]
    out = gather_outputs(outputs, sizes, torch.device("cpu"))
    assert isinstance(out, Prediction) and out.model == "tiny"
    assert out.names == names
    assert out.logits.squeeze(1).tolist() == list(range(sum(sizes)))


def test_per_sample_lists_of_variable_length_tensors_and_uneven_tuples_are_concatenated() -> None:
    cpu = torch.device("cpu")
    ragged = [[torch.ones(1), torch.ones(4)], [torch.ones(2)]]
    assert [t.numel() for t in gather_outputs(ragged, [2, 1], cpu)] == [1, 4, 2]
    assert gather_outputs([("a", "b", "c"), ("d", "e")], [3, 2], cpu) == ("a", "b", "c", "d", "e")


def test_records_whose_length_matches_even_shards_are_gathered_item_by_item() -> None:
    outputs = [(torch.tensor(1.0), torch.zeros(2, 3)), (torch.tensor(3.0), torch.ones(2, 3))]
    loss, logits = gather_outputs(outputs, [2, 2], torch.device("cpu"))
    assert loss.item() == pytest.approx(2.0) and logits.shape == (4, 3)


def test_a_list_of_batched_tensors_is_a_record_even_when_its_length_is_the_shard_size() -> None:
    outputs = [[torch.zeros(2, 3), torch.zeros(2, 5)], [torch.ones(2, 3), torch.ones(2, 5)]]
    logits, features = gather_outputs(outputs, [2, 2], torch.device("cpu"))
    assert logits.shape == (4, 3) and features.shape == (4, 5)
    assert logits[:, 0].tolist() == [0.0, 0.0, 1.0, 1.0]


@pytest.mark.parametrize("sizes", [[2, 2], [2, 1]])
def test_a_loss_beside_logits_is_a_record_whatever_the_shard_sizes(sizes: list[int]) -> None:
    outputs = [[torch.tensor(float(i)), torch.full((n, 3), float(i))] for i, n in enumerate(sizes)]
    loss, logits = gather_outputs(outputs, sizes, torch.device("cpu"))
    assert loss.item() == pytest.approx(sizes[1] / sum(sizes))
    assert logits.shape == (sum(sizes), 3)


def test_a_list_of_numbers_is_a_record_even_with_one_number_per_sample() -> None:
    assert gather_outputs([[1.0, 3.0], [3.0, 5.0]], [2, 2], torch.device("cpu")) == [2.0, 4.0]


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([{"done": True}, {"done": False}], r"different values at output\['done'\]: True, False"),
        ([{"tag": ("x", "a")}, {"tag": ("x", "b")}], r"different values at output\['tag'\]\[1\]: 'a', 'b'"),
        ([Prediction(torch.ones(1), ["a"], "m1"), Prediction(torch.ones(1), ["b"], "m2")], r"output\.model"),
        ([[1.0, 2.0, 3.0], [1.0]], r"different lengths at output: \[3, 1\], for shards of \[2, 2\]"),
    ],
)
def test_outputs_that_disagree_across_replicas_name_their_path(outputs: list[object], message: str) -> None:
    with pytest.raises(GatherError, match=message):
        gather_outputs(outputs, [2, 2] if "lengths" in message else [1, 1], torch.device("cpu"))


def test_values_every_replica_agrees_on_are_kept() -> None:
    out = gather_outputs(
        [{"done": True, "tag": None}, {"done": True, "tag": None}], [1, 1], torch.device("cpu")
    )
    assert out == {"done": True, "tag": None}
