"""Placement plans: manual maps, auto balancing, the table, free-memory checks, bad input, moving hooks."""

from __future__ import annotations

import ast
import re

import pytest
import torch
from torch import nn

from examples.models import TransformerNet
from lightning_gpupar.model_split import PlacementError, apply_placement, infer_stages, plan_placement
from lightning_gpupar.model_split.paths import module_bytes

CPU2 = [torch.device("cpu"), torch.device("cpu")]
MAP = {"model.embed": 0, "model.blocks.0-1": 0, "model.blocks.2-3": 1, "model.head": 1}


class Wrapper(nn.Module):
    """Stands in for a LightningModule: the network is ``self.model``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model


def transformer(layers: int = 4) -> Wrapper:
    return Wrapper(TransformerNet(16, 32, 4, layers, 2, 16))


def test_manual_map_expands_ranges_and_keeps_every_parameter() -> None:
    plan = plan_placement(transformer(), CPU2, MAP)
    positions = {e.path: e.position for e in plan.entries}
    assert positions == {
        "model.embed": 0,
        "model.blocks.0": 0,
        "model.blocks.1": 0,
        "model.blocks.2": 1,
        "model.blocks.3": 1,
        "model.head": 1,
    }
    assert sum(e.num_params for e in plan.entries) == sum(p.numel() for p in transformer().parameters())
    assert plan.output_position == 1


def test_plan_on_the_meta_device_allocates_nothing_and_prints_a_table() -> None:
    with torch.device("meta"):
        model = transformer()
    plan = plan_placement(model, CPU2, MAP)
    assert all(p.is_meta for p in model.parameters())
    table = plan.table()
    block_bytes = module_bytes(model.model.blocks[0])[1]
    assert "model.blocks.2" in table and "parameters" in table and "bytes" in table
    totals = plan.bytes_per_position()
    assert totals[1] == 2 * block_bytes + module_bytes(model.model.head)[1]
    assert "total  <- output" in table


def test_auto_balances_bytes_by_whole_stages() -> None:
    model = transformer(layers=4)
    plan = plan_placement(model, CPU2, "auto")
    assert [e.path for e in plan.entries] == infer_stages(model)
    positions = [e.position for e in plan.entries]
    assert positions == sorted(positions) and set(positions) == {0, 1}  # contiguous, both used
    first, second = plan.bytes_per_position()
    assert abs(first - second) <= module_bytes(model.model.blocks[0])[1]


def test_infer_stages_follows_the_chain_and_expands_module_lists() -> None:
    assert infer_stages(transformer(2)) == ["model.embed", "model.blocks.0", "model.blocks.1", "model.head"]
    seq = Wrapper(nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1)))
    assert infer_stages(seq) == ["model.0", "model.1", "model.2"]


def test_auto_respects_max_memory_caps() -> None:
    model = transformer(layers=4)
    # caps bound training memory: parameters, gradients and (without an optimizer) Adam's two states
    block = 4 * module_bytes(model.model.blocks[0])[1]
    plan = plan_placement(model, CPU2, "auto", max_memory={0: int(1.5 * block)})
    assert plan.need_per_position()[0] <= 1.5 * block
    assert [e.path for e in plan.entries if e.position == 0] == ["model.embed", "model.blocks.0"]
    with pytest.raises(PlacementError, match=r"cannot fit .*max_memory"):
        plan_placement(model, CPU2, "auto", max_memory={"0": 10, 1: 10})


def test_auto_splits_a_sequential_only_when_allowed() -> None:
    model = Wrapper(nn.Sequential(nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)]), nn.Linear(8, 8)))
    split = plan_placement(model, CPU2, "auto", max_memory={0: 3 * 300})
    assert "model.0.0" in {e.path for e in split.entries}
    whole = plan_placement(model, CPU2, "auto", no_split=["Sequential"])
    assert {e.path for e in whole.entries} == {"model"}  # the named class is kept whole (issue 10)


def test_leftovers_are_an_error_listing_them_or_go_to_the_default_device() -> None:
    listing = r"model\.blocks\.2, model\.blocks\.3, model\.head.*default_device"
    with pytest.raises(PlacementError, match=listing):
        plan_placement(transformer(), CPU2, {"model.embed": 0, "model.blocks.0-1": 1})
    plan = plan_placement(transformer(), CPU2, {"model.embed": 0, "model.blocks.0-1": 1}, default_device=0)
    defaults = {e.path for e in plan.entries if e.source == "default"}
    assert defaults == {"model.blocks.2", "model.blocks.3", "model.head"}
    assert plan.position_of("model.head.linear") == 0
    assert plan.output_position == 1  # the last submodule the map placed


@pytest.mark.parametrize(
    ("placement", "message"),
    [
        ({"model.embd": 0}, r"No submodule 'model\.embd'\. Did you mean 'model\.embed'\?.*model\.blocks"),
        ({"model.blocks.0-5": 0}, r"model\.blocks \(ModuleList\) has no entry 4, 5; it has 4 entries"),
        ({"model": 0, "model.head": 1}, r"Overlapping placement: 'model' and 'model\.head'"),
        ({"model.blocks.0-2": 0, "model.blocks.2-3": 1}, r"Overlapping.*'model\.blocks\.0-2' and '.*2-3'"),
        ({"model": 2}, r"position 2 is out of range.*there are 2 \(0: cpu, 1: cpu\)"),
        ("everything", r"write 'auto' or a map"),
    ],
)
def test_bad_placements_say_what_is_wrong(placement: object, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        plan_placement(transformer(), CPU2, placement)  # type: ignore[arg-type]


def test_tied_parameters_on_two_devices_are_refused() -> None:
    model = Wrapper(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    model.model[1].weight = model.model[0].weight
    with pytest.raises(PlacementError, match=r"same \(tied\) parameter"):
        plan_placement(model, CPU2, {"model.0": 0, "model.1": 1})


def test_free_memory_check_reports_the_numbers() -> None:
    plan = plan_placement(transformer(), [torch.device("cuda", 0), torch.device("cuda", 1)], MAP)
    need = plan.bytes_per_position()
    plan.check_free_memory(lambda d: 10 * max(need))
    with pytest.raises(PlacementError, match=r"cuda:1 needs .* but has 1\.0 KiB free"):
        plan.check_free_memory(lambda d: 10 * max(need) if d.index == 0 else 1024)


def test_hooks_move_inputs_to_each_submodule_and_are_removable() -> None:
    # The meta device stands in for a second accelerator: a CPU tensor reaching a meta Linear would fail.
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    plan = plan_placement(model, [torch.device("cpu"), torch.device("meta")], {"0-1": 0, "2": 1})
    handle = apply_placement(model, plan)
    assert model[0].weight.device.type == "cpu" and model[2].weight.is_meta
    out = model(torch.randn(5, 3))
    assert out.is_meta and out.shape == (5, 2)
    handle.remove()
    with pytest.raises(RuntimeError):
        model(torch.randn(5, 3))


def tiny_t5() -> nn.Module:
    """T5's embedding is held four ways: ``shared``, ``encoder.embed_tokens``, ``decoder.embed_tokens``,
    ``lm_head``."""
    transformers = pytest.importorskip("transformers")
    config = transformers.T5Config(
        vocab_size=32, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2,
        tie_word_embeddings=True, decoder_start_token_id=0,
    )  # fmt: skip
    return transformers.T5ForConditionalGeneration(config)


@pytest.mark.parametrize(
    "placement",
    [
        {"shared": 0, "encoder": 0, "decoder": 1, "lm_head": 1},
        {"shared": 0, "encoder": 1, "decoder": 1, "lm_head": 1},
        {"shared": 1, "encoder": 0, "decoder": 0, "lm_head": 1},
    ],
)
def test_the_suggested_map_for_a_parameter_tied_many_ways_is_accepted(placement: dict[str, int]) -> None:
    """Issue 20 point 5: the suggestion moved only the first conflicting holder and was refused in turn."""
    model = tiny_t5()
    with pytest.raises(PlacementError, match=r"same \(tied\) parameter") as refused:
        plan_placement(model, CPU2, placement)
    found = re.search(r"placement=(\{[^}]*\})", str(refused.value))
    assert found, str(refused.value)
    suggested = ast.literal_eval(found.group(1))
    plan = plan_placement(model, CPU2, suggested)  # accepted
    weight = model.shared.weight
    holding = [e for e in plan.entries if any(p is weight for p in model.get_submodule(e.path).parameters())]
    assert len({e.position for e in holding}) == 1
    assert {e.position for e in plan.entries} == {0, 1}  # still split over both devices
