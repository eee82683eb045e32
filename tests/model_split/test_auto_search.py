"""placement='auto' finds a plan whenever one exists under the caps: accelerate's planner cases
(tests/test_modeling_utils.py, ``infer_auto_device_map``) ported to our auto placement, and a brute-force
search over every cut of small random models that auto must match (tied parameters in the smallest units
that hold them, as auto keeps them: a cut that pulls a whole module along with its tied weight could fit
where none of these does, by moving the module's other layers out of execution order; auto does not).

The models are frozen (``requires_grad_(False)``): no gradients, no optimizer state, no example input, so a
unit's training memory is its parameters' and buffers' bytes, which the brute force counts on its own.
"""

from __future__ import annotations

import itertools
import random
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import pytest
import torch
from torch import Tensor, nn

from lightning_gpupar.model_split import PlacementError, plan_placement

CPU2 = [torch.device("cpu")] * 2


class ModelForTest(nn.Module):
    """accelerate's test model: linear1 64 B, batchnorm 72 B (32 B of it buffers), linear2 100 B."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(3, 4)
        self.batchnorm = nn.BatchNorm1d(4)
        self.linear2 = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear2(self.batchnorm(self.linear1(x)))


def three_layers() -> nn.Sequential:
    names = ("layer1", "layer2", "layer3")
    return nn.Sequential(OrderedDict((name, ModelForTest()) for name in names)).requires_grad_(False)


def fits(plan: object, caps: Sequence[int]) -> bool:
    need = plan.need_per_position()  # type: ignore[attr-defined]
    return all(n <= c for n, c in zip(need, caps, strict=True))


def test_three_tied_weights_pull_only_their_own_layers_along() -> None:
    model = three_layers()
    model.layer2.linear2.weight = model.layer1.linear2.weight
    model.layer3.linear2.weight = model.layer1.linear2.weight
    plan = plan_placement(model, CPU2, "auto", max_memory={0: 400, 1: 500})
    assert plan.need_per_position() == [276, 272]  # layer1 + the tied linear2s | the rest
    positions = {plan.position_of(f"layer{i}.linear2") for i in (1, 2, 3)}
    assert positions == {0}


def test_two_tie_groups_use_both_devices() -> None:
    model = three_layers()
    model.layer2.linear2.weight = model.layer1.linear2.weight
    model.layer3.linear2.weight = model.layer1.linear2.weight
    model.layer2.linear1.weight = model.layer1.linear1.weight
    plan = plan_placement(model, CPU2, "auto", max_memory={0: 400, 1: 500})
    need = plan.need_per_position()
    assert sum(need) == 500 and fits(plan, [400, 500])
    assert min(need) > 0, f"a device left empty: {need}"
    assert plan.position_of("layer2.linear1") == plan.position_of("layer1.linear1")


def nested_five() -> nn.Sequential:
    """168 B, 16 B, (16 B, 80 B), 68 B: fits as 200 B | 148 B, but only by cutting inside the inner pair."""
    inner = nn.Sequential(nn.Linear(1, 2), nn.Linear(4, 4))
    return nn.Sequential(nn.Linear(6, 6), nn.Linear(1, 2), inner, nn.Linear(16, 1)).requires_grad_(False)


def test_a_module_taken_whole_on_the_last_device_is_split_again_when_later_ones_overflow() -> None:
    plan = plan_placement(nested_five(), CPU2, "auto", max_memory={0: 200, 1: 150})
    assert plan.need_per_position() == [200, 148]
    assert plan.position_of("2.0") == 0 and plan.position_of("2.1") == 1


def test_a_layer_registered_twice_is_in_the_plan_under_both_names() -> None:
    layer = nn.Linear(4, 4)
    model = nn.Sequential(layer, layer, nn.Linear(4, 4), nn.Linear(4, 4))
    plan = plan_placement(model, CPU2, "auto")
    assert plan.position_of("1") == plan.position_of("0") is not None
    for key in model.state_dict(keep_vars=True):
        assert plan.position_of(key) is not None, key
    assert "1 (same module as 0)" in plan.entry_table()
    assert sum(e.num_params for e in plan.entries) == sum(p.numel() for p in model.parameters())


# -- brute force over every cut of small random models -----------------------------------------------------


def random_model(rng: random.Random) -> nn.Module:
    """A random tree of Sequential containers over 3-7 Linear / BatchNorm leaves, some weights tied."""
    leaves: list[nn.Module] = []

    def node(depth: int) -> nn.Module:
        if depth >= 3 or rng.random() < 0.45:
            leaf: nn.Module = (
                nn.BatchNorm1d(rng.randint(1, 4)) if rng.random() < 0.15 else nn.Linear(rng.randint(1, 5), 3)
            )
            leaves.append(leaf)
            return leaf
        return nn.Sequential(*[node(depth + 1) for _ in range(rng.randint(1, 3))])

    model = nn.Sequential(*[node(1) for _ in range(rng.randint(2, 4))])
    linears = [leaf for leaf in leaves if isinstance(leaf, nn.Linear)]
    for _ in range(rng.randint(0, 2)):
        a, b = rng.sample(linears, 2) if len(linears) > 1 else (linears[0], linears[0])
        if a is not b and a.weight.shape == b.weight.shape:
            b.weight = a.weight
    return model.requires_grad_(False)


def cuts(root: nn.Module, path: str = "") -> Iterator[list[str]]:
    """Every set of units the splitting rules allow: a module whole (unless it holds a parameter some module
    outside it holds too: tied parameters sit in the smallest units holding them), or, a container, its
    children's cuts."""
    module = root.get_submodule(path)
    inside = {id(p) for p in module.parameters()}
    outside = {
        id(p) for p_path, m in root.named_modules() if not _within(p_path, path) for p in m.parameters(False)
    }
    children = [(f"{path}.{n}" if path else n) for n, _ in module.named_children()]
    if not (inside & outside) or not children:
        yield [path]
    if isinstance(module, nn.Sequential) and children:
        for combo in itertools.product(*[list(cuts(root, child)) for child in children]):
            yield [unit for part in combo for unit in part]


def _within(path: str, ancestor: str) -> bool:
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def tensors(root: nn.Module, path: str) -> list[Tensor]:
    module = root.get_submodule(path)
    return [*module.parameters(), *module.buffers()]


def merged_sizes(root: nn.Module, units: list[str]) -> list[int]:
    """Bytes of each group of units sharing a tensor, the groups in the order of their first unit."""
    groups: list[list[str]] = []
    for unit in units:
        ids = {id(t) for t in tensors(root, unit)}
        touching = [i for i, g in enumerate(groups) if ids & {id(t) for u in g for t in tensors(root, u)}]
        if not touching:
            groups.append([unit])
            continue
        groups[touching[0]] = [u for i in touching for u in groups[i]] + [unit]
        groups = [g for i, g in enumerate(groups) if i not in touching[1:]]
    sizes = []
    for group in groups:
        unique = {id(t): t for u in group for t in tensors(root, u)}
        sizes.append(sum(t.numel() * t.element_size() for t in unique.values()))
    return sizes


def splits(sizes: list[int], devices: int) -> Iterator[list[int]]:
    """Device totals of every split of ``sizes`` into contiguous runs, one per device (runs may be empty)."""
    for cut in itertools.combinations_with_replacement(range(len(sizes) + 1), devices - 1):
        bounds = [0, *cut, len(sizes)]
        yield [sum(sizes[bounds[i] : bounds[i + 1]]) for i in range(devices)]


def brute_force_fits(root: nn.Module, caps: Sequence[int]) -> bool:
    """Whether some cut, units sharing a tensor merged at the first one's place, split over the devices in
    order (each device a contiguous run of them), fits under ``caps``."""
    return any(
        all(t <= c for t, c in zip(totals, caps, strict=True))
        for units in cuts(root)
        for totals in splits(merged_sizes(root, units), len(caps))
    )


def random_caps(rng: random.Random, model: nn.Module, devices: int) -> list[int]:
    """Half the time the totals of a random split of some cut (tight: brute force fits, just), else random."""
    if rng.random() < 0.5:
        units = rng.choice(list(cuts(model)))
        options = list(splits(merged_sizes(model, units), devices))
        return [max(t, 4) for t in rng.choice(options)]
    total = sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors(model, "")}.values())
    return [max(4, int(total * rng.uniform(0.25, 0.8))) for _ in range(devices)]


@pytest.mark.parametrize("seed", range(6))
def test_auto_places_every_random_model_that_brute_force_places(seed: int) -> None:
    rng = random.Random(seed)
    placed = refused = 0
    for _ in range(25):
        model = random_model(rng)
        n = rng.choice([2, 3])
        caps = random_caps(rng, model, n)
        possible = brute_force_fits(model, caps)
        try:
            plan = plan_placement(model, [torch.device("cpu")] * n, "auto", max_memory=dict(enumerate(caps)))
        except PlacementError:
            assert not possible, f"auto refused a model brute force places under {caps}:\n{model}"
            refused += 1
        else:
            assert fits(plan, caps), (plan.need_per_position(), caps)
            assert possible, "auto placed what brute force cannot: the brute force is wrong"
            placed += 1
    assert placed and refused  # both outcomes were exercised


@pytest.mark.parametrize("no_split", [(), ("ModelForTest",)])
def test_a_bigger_model_splits_at_the_layer_level_or_at_no_split_modules(no_split: tuple[str, ...]) -> None:
    model = nn.Sequential(ModelForTest(), ModelForTest(), ModelForTest()).requires_grad_(False)
    plan = plan_placement(model, CPU2, "auto", max_memory={0: 500, 1: 500}, no_split=no_split)
    assert fits(plan, [500, 500]) and sum(plan.need_per_position()) == 708
    if no_split:
        assert {e.path for e in plan.entries} == {"0", "1", "2"}
