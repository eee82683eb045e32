"""placement='auto' and plans in general: tied parameters, no_split, training memory and its sources, caps
and their bad input, a model that cannot fit, the table, the partition plug-in, pipelined chain units."""

from __future__ import annotations

import re
from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn

from examples.models import TransformerNet
from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.devices import format_bytes
from lightning_gpupar.model_split import PipelineError, PlacementError, infer_stages, plan_placement
from lightning_gpupar.model_split.balance.by_memory import ChainUnit
from lightning_gpupar.model_split.paths import module_bytes

CPU2 = [torch.device("cpu")] * 2


class TiedLM(nn.Module):
    """Embedding -> body -> head, the head's weight tied to the embedding's (as GPT-2's lm_head)."""

    def __init__(self, vocab: int = 50, width: int = 16, layers: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.body = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, tokens: Tensor) -> Tensor:
        return self.head(self.body(self.embed(tokens)))


class Wrapper(nn.Module):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def transformer(layers: int = 4) -> Wrapper:
    return Wrapper(TransformerNet(16, 32, 4, layers, 2, 16))


# -- issue 10: tied parameters and no_split -------------------------------------------------------------


def test_auto_keeps_tied_parameters_on_one_device_and_counts_them_once() -> None:
    model = TiedLM()
    for n in (2, 3):
        plan = plan_placement(model, [torch.device("cpu")] * n, "auto")
        assert plan.position_of("head") == plan.position_of("embed")
        assert sum(e.num_params for e in plan.entries) == sum(p.numel() for p in model.parameters())
        assert sum(p.params for p in plan.memory_per_position()) == module_bytes(model)[1]
        assert plan.tied == {"head.weight": "embed.weight"}


def test_a_manual_map_that_splits_tied_parameters_names_them_and_a_placement_that_works() -> None:
    message = (
        r"embed\.weight and head\.weight are the same \(tied\) parameter, placed on positions 0 and 1\. "
        r".*place head on position 0 \(or embed on 1\), e\.g\. placement=\{'embed': 0, 'body': 1, 'head': 0\}"
    )
    with pytest.raises(PlacementError, match=message):
        plan_placement(TiedLM(), CPU2, {"embed": 0, "body": 1, "head": 1})
    plan_placement(TiedLM(), CPU2, {"embed": 0, "body": 1, "head": 0})  # the suggested map is accepted


def test_no_split_keeps_the_named_class_whole_as_a_stage_and_a_unit() -> None:
    model = transformer()
    assert infer_stages(model, no_split=["TransformerNet"]) == ["model"]
    plan = plan_placement(model, CPU2, "auto", no_split=["TransformerNet"])
    assert [e.path for e in plan.entries] == ["model"]
    pipelined = plan_placement(model, CPU2, "auto", stages=infer_stages(model, ["TransformerNet"]))
    assert [e.path for e in pipelined.entries] == ["model"]


def test_a_no_split_class_the_model_lacks_is_refused_naming_its_classes() -> None:
    message = r"no_split names \['Blok'\], but the model has no module of that class\. Its classes: .*TiedLM"
    with pytest.raises(PlacementError, match=message):
        plan_placement(TiedLM(), CPU2, "auto", no_split=["Blok"])


# -- training memory ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "per_param", "source"),
    [
        (lambda ps: torch.optim.Adam(ps), 2, r"Adam: 2 tensors"),
        (
            lambda ps: torch.optim.AdamW(ps, amsgrad=True),
            3,
            r"AdamW: 2 tensors per parameter \(3 with amsgrad",
        ),
        (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), 1, r"SGD: 1 tensor"),
        (lambda ps: torch.optim.SGD(ps, lr=0.1), 0, r"SGD: 1 tensor per parameter with momentum, none"),
        (lambda ps: torch.optim.Adagrad(ps), 1, r"Adagrad: measured by one step on the meta device"),
        (lambda ps: torch.optim.RMSprop(ps, momentum=0.9), 2, r"RMSprop: measured"),
        (lambda ps: None, 2, r"assumed Adam-style"),
    ],
)
def test_optimizer_state_per_parameter(make: object, per_param: int, source: str) -> None:
    model = TiedLM()
    model.body[0].requires_grad_(False)  # frozen: no gradient, no state
    trainable = sum(p.numel() * 4 for p in model.parameters() if p.requires_grad)
    plan = plan_placement(
        model, CPU2, "auto", optimizer=make([p for p in model.parameters() if p.requires_grad])
    )  # type: ignore[operator]
    parts = plan.memory_per_position()
    assert sum(p.grads for p in parts) == trainable
    assert sum(p.optimizer for p in parts) == per_param * trainable
    assert re.search(source, plan.sources["optimizer"])


def test_activations_are_measured_per_module_on_the_meta_device_or_said_to_be_missing() -> None:
    with torch.device("meta"):
        model = TiedLM()
    plan = plan_placement(model, CPU2, "auto", example_input=torch.zeros(8, 12, dtype=torch.long))
    parts = plan.memory_per_position()
    assert all(p.activations > 0 for p in parts)
    assert plan.sources["activations"] == "measured on the meta device (example input, batch of 8)"
    half = plan_placement(model, CPU2, "auto", example_input=torch.zeros(4, 12, dtype=torch.long))
    assert sum(p.activations for p in half.memory_per_position()) * 2 == sum(p.activations for p in parts)
    bare = plan_placement(model, CPU2, "auto")
    assert sum(p.activations for p in bare.memory_per_position()) == 0
    assert "not counted: no example input" in bare.sources["activations"]
    assert "activations: not counted: no example input" in bare.table()


# -- caps and their bad input; a model that cannot fit --------------------------------------------------


@pytest.mark.parametrize(
    ("max_memory", "message"),
    [
        (
            {2: "1GiB"},
            r"max_memory\[2\]: the keys are device positions, positions 0\.\.1 \(cpu, cpu\); 2 is not",
        ),
        ({"gpu0": "1GiB"}, r"max_memory\['gpu0'\]: the keys are device positions, positions 0\.\.1"),
        ({0: "lots"}, r"max_memory\[0\]='lots' is not a positive size: write bytes as an int, or .*10GiB"),
        ({0: 0}, r"max_memory\[0\]=0 is not a positive size"),
        ({1: "-5MiB"}, r"max_memory\[1\]='-5MiB' is not a positive size"),
    ],
)
def test_bad_max_memory_is_named_with_what_is_valid(max_memory: dict, message: str) -> None:
    with pytest.raises(PlacementError, match=message):
        plan_placement(TiedLM(), CPU2, "auto", max_memory=max_memory)


def test_a_model_that_cannot_fit_shows_the_need_the_caps_and_the_smallest_fix() -> None:
    model = transformer()
    need = sum(plan_placement(model, CPU2, "auto").need_per_position())
    cap = need // 4
    with pytest.raises(PlacementError) as error:
        plan_placement(model, CPU2, "auto", max_memory={0: cap, 1: cap})
    text = str(error.value)
    assert "cannot fit the model under max_memory" in text
    assert "0 (cpu): " in text and "1 (cpu): " in text and "(params " in text and "optimizer " in text
    assert "cap " in text
    assert "more device(s)" in text and "max_memory of at least" in text
    with pytest.raises(PlacementError, match=r"removing TransformerNet from no_split"):
        plan_placement(
            model, CPU2, "auto", max_memory={0: need // 2 + 1, 1: need // 2 + 1}, no_split=["TransformerNet"]
        )


# -- the table --------------------------------------------------------------------------------------------


def test_the_table_shows_each_part_per_device_the_headroom_and_a_bar() -> None:
    model = TiedLM()
    plan = plan_placement(
        model, CPU2, "auto", max_memory={0: "40KiB"}, example_input=torch.zeros(2, 5, dtype=torch.long)
    )
    table = plan.table()
    header = next(line for line in table.splitlines() if line.startswith("pos"))
    for column in ("params", "buffers", "grads", "optimizer", "activations", "total", "limit", "headroom"):
        assert column in header
    row0 = next(line for line in table.splitlines() if line.startswith("0 "))
    assert "40.0 KiB cap" in row0 and "█" in row0
    headroom = 40 * 1024 - plan.need_per_position()[0]
    assert format_bytes(headroom) in row0
    assert "balance: largest/smallest device total" in table


# -- the partition plug-in, pipelined chain units ------------------------------------------------------------


def test_a_partition_function_gets_the_chain_units_and_decides_the_positions() -> None:
    seen: list[Sequence[ChainUnit]] = []

    def last_on_one(units: Sequence[ChainUnit], caps: Sequence[float]) -> list[int]:
        seen.append(units)
        return [0] * (len(units) - 1) + [1]

    plan = plan_placement(transformer(), CPU2, "auto", partition=last_on_one)
    (units,) = seen
    assert [u.units[0][0] for u in units][-1] == "model.head"
    assert all(u.cost == u.memory.total > 0 for u in units)
    assert [e.path for e in plan.entries if e.position == 1] == ["model.head"]


class NotAChain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.a(x)))  # relu between the stages: not a chain


def test_pipelined_auto_places_chain_units_and_refuses_a_forward_that_is_no_chain() -> None:
    module = Wrapper(NotAChain())
    strategy = ModelSplitStrategy("auto", chunks=2, parallel_devices=CPU2)
    strategy.connect(module)  # type: ignore[arg-type]
    strategy.model_to_device()
    assert strategy.applied is not None
    assert [e.path for e in strategy.applied.plan.entries] == ["model.a", "model.b"]
    with pytest.raises(
        PipelineError, match=r"model.a -> model.b, but model.b does not receive model.a's output"
    ):
        module(torch.randn(4, 4))
