"""normalize_state_dict on state dicts that torch's own wrappers produced."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from lightning_gpupar.checkpoint import KeyCollisionError, canonical_names, normalize_state_dict
from tests.helpers.checkpoint_support import ModuleNextToAParameter, TinyModule, make_net

PLAIN = list(make_net().state_dict())


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda m: nn.DataParallel(m), id="DataParallel"),
        pytest.param(lambda m: torch.compile(m), id="compile"),
        pytest.param(lambda m: nn.DataParallel(torch.compile(m)), id="DataParallel(compile)"),
        pytest.param(lambda m: torch.compile(nn.DataParallel(m)), id="compile(DataParallel)"),
        pytest.param(lambda m: nn.DataParallel(nn.DataParallel(m)), id="DataParallel twice"),
    ],
)
def test_wrapped_network_gets_the_plain_keys(wrap: Callable[[nn.Module], nn.Module]) -> None:
    wrapped = wrap(make_net()).state_dict()
    assert list(wrapped) != PLAIN  # the wrapper did add segments
    normalized = normalize_state_dict(wrapped)
    assert list(normalized) == PLAIN
    assert all(normalized[k] is wrapped[w] for k, w in zip(PLAIN, wrapped, strict=True))


def test_segments_inside_the_key_path_are_removed() -> None:
    module = TinyModule()
    module.model = torch.compile(nn.DataParallel(module.model))
    keys = list(module.state_dict())
    assert keys[0] == "model._orig_mod.module.0.weight"
    assert list(normalize_state_dict(module.state_dict())) == [f"model.{k}" for k in PLAIN]


def test_metadata_follows_the_keys_and_keeps_the_inner_modules_version() -> None:
    net = make_net()
    net[1]._version = 7  # type: ignore[assignment]  # mark the BatchNorm's metadata
    normalized = normalize_state_dict(nn.DataParallel(net).state_dict())
    metadata = normalized._metadata  # type: ignore[attr-defined]
    assert set(metadata) == set(net.state_dict()._metadata)  # type: ignore[attr-defined]
    assert metadata["1"]["version"] == 7
    fresh = make_net()
    fresh.load_state_dict(normalized)  # torch accepts the result as-is


def test_input_is_left_unchanged() -> None:
    wrapped = nn.DataParallel(make_net()).state_dict()
    before = list(wrapped)
    normalize_state_dict(wrapped)
    assert list(wrapped) == before


def test_an_attribute_named_module_next_to_others_is_not_a_wrapper() -> None:
    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = nn.Linear(2, 2)
            self.head = nn.Linear(2, 1)

    keys = list(Holder().state_dict())
    assert list(normalize_state_dict(Holder().state_dict())) == keys
    assert canonical_names(["net.module"]) == {"net.module": "net.module"}  # a tensor's own name stays


def test_an_attribute_named_module_next_to_a_parameter_is_not_a_wrapper() -> None:
    keys = ["bias", "module.weight", "module.bias"]
    assert list(ModuleNextToAParameter().state_dict()) == keys
    assert canonical_names(keys) == {k: k for k in keys}
    assert canonical_names(["module.weight", "temperature"]) == {
        "module.weight": "module.weight",
        "temperature": "temperature",
    }
    assert list(normalize_state_dict(ModuleNextToAParameter().state_dict())) == keys
    nested = {f"net.{k}": v for k, v in ModuleNextToAParameter().state_dict().items()}
    assert list(normalize_state_dict(nested)) == list(nested)


def test_the_same_tensor_under_two_wrapper_paths_is_kept_once() -> None:
    net = make_net()

    class FabricLike(nn.Module):  # the raw state dict of Fabric's module wrapper
        def __init__(self) -> None:
            super().__init__()
            self._forward_module = nn.DataParallel(net)
            self._original_module = net

    normalized = normalize_state_dict(FabricLike().state_dict())
    assert list(normalized) == PLAIN


def test_a_collision_is_an_error_listing_the_keys() -> None:
    state = {"net.module.w": torch.zeros(2), "net._orig_mod.w": torch.ones(2), "head.b": torch.zeros(1)}
    with pytest.raises(KeyCollisionError) as err:
        normalize_state_dict(state)
    assert "net.w: net.module.w, net._orig_mod.w" in str(err.value)
