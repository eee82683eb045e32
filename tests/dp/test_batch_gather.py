"""Splitting nested batches into shards and gathering shard outputs back."""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from lightning_gpupar.dp.batch import (
    AMBIGUOUS,
    PER_SAMPLE,
    RECORD,
    BatchSplitError,
    describe,
    sequence_role,
    shard_sizes,
    split_batch,
)
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


def test_a_list_of_numbers_as_long_as_every_shard_is_refused_as_ambiguous() -> None:
    """``preds.tolist()`` (one number per sample) or a record of numbers? Averaging per-sample predictions
    would be silently wrong, so it is refused (issue 20; before, it was averaged item by item)."""
    with pytest.raises(GatherError, match=r"Cannot tell whether the sequences at output hold one item per"):
        gather_outputs([[1.0, 3.0], [3.0, 5.0]], [2, 2], torch.device("cpu"))
    record = gather_outputs([[1.0, 3.0], [5.0, 7.0]], [3, 2], torch.device("cpu"))  # weighted means
    assert record == pytest.approx([(3 * 1.0 + 2 * 5.0) / 5, (3 * 3.0 + 2 * 7.0) / 5])
    assert gather_outputs([[1, 2, 3], [4, 5]], [3, 2], torch.device("cpu")) == [1, 2, 3, 4, 5]  # uneven


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


# -- lists with one item per sample (issue 20): split with their samples, by the rule gather uses ---------


@pytest.mark.parametrize("kind", [list, tuple])
def test_a_list_of_strings_with_one_per_sample_is_split_with_the_samples(kind: type) -> None:
    batch = {"x": torch.arange(5), "names": kind(f"s{i}" for i in range(5)), "split": "train"}
    shards, sizes = split_batch(batch, 2)
    assert sizes == [3, 2]
    assert [[f"{n}={int(x)}" for n, x in zip(s["names"], s["x"], strict=True)] for s in shards] == [
        ["s0=0", "s1=1", "s2=2"],
        ["s3=3", "s4=4"],
    ]
    assert all(type(s["names"]) is kind and s["split"] == "train" for s in shards)


def test_a_default_collated_batch_of_tensors_and_names_is_split_with_the_samples() -> None:
    from torch.utils.data import default_collate

    batch = default_collate([(torch.full((2,), float(i)), f"s{i}") for i in range(4)])
    assert isinstance(batch, list) and batch[1] == ("s0", "s1", "s2", "s3")
    shards, _ = split_batch(batch, 2)
    assert [s[1] for s in shards] == [("s0", "s1"), ("s2", "s3")]
    assert [s[0][:, 0].tolist() for s in shards] == [[0.0, 1.0], [2.0, 3.0]]


def test_per_sample_targets_holding_tensors_of_their_own_sizes_are_split_with_the_samples() -> None:
    """Detection-style targets: one dict per sample, each with its own number of boxes."""
    targets = [{"boxes": torch.zeros(k, 4), "label": f"img{k}"} for k in (1, 4, 2)]
    shards, sizes = split_batch({"images": torch.zeros(3, 1, 2, 2), "targets": targets}, 2)
    assert sizes == [2, 1]
    assert [[t["label"] for t in s["targets"]] for s in shards] == [["img1", "img4"], ["img2"]]
    assert shards[0]["targets"][1]["boxes"].shape == (4, 4)


@pytest.mark.parametrize(
    "batch",
    [
        {"x": torch.zeros(3, 2), "ids": [4, 9, 1]},  # one id per sample, or three numbers?
        {"x": torch.zeros(2, 2), "pair": [torch.zeros(2), "a"]},  # a batch beside a sample's value
    ],
)
def test_an_ambiguous_list_is_refused_with_the_batch_structure(batch: dict[str, object]) -> None:
    with pytest.raises(BatchSplitError, match=r"Cannot tell whether the list .* in the batch dict\(x=Tensor"):
        split_batch(batch, 2)


def test_lists_of_other_lengths_and_records_are_given_whole_or_split_item_by_item() -> None:
    batch = {"x": torch.zeros(4, 2), "classes": ["cat", "dog"], "pair": (torch.ones(4), torch.zeros(4))}
    shards, _ = split_batch(batch, 2)
    assert all(s["classes"] == ["cat", "dog"] and s["pair"][0].shape == (2,) for s in shards)


def test_split_and_gather_share_one_rule() -> None:
    """What the split treats as per-sample, gather concatenates; what it refuses, gather refuses."""
    cpu = torch.device("cpu")
    names = ["a", "b", "c"]
    assert sequence_role(names, 3) == PER_SAMPLE and sequence_role(names, 2) == RECORD
    assert sequence_role([1, 2, 3], 3) == AMBIGUOUS
    shards, sizes = split_batch({"x": torch.zeros(3), "names": names}, 2)
    assert gather_outputs([s["names"] for s in shards], sizes, cpu) == names
    with pytest.raises(GatherError, match="Cannot tell"):
        gather_outputs([[1, 2], [3, 4]], [2, 2], cpu)
