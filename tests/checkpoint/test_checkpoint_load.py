"""load_state_dict_flexible: any wrapped source into any wrapped target, or one readable error."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from lightning_gpupar.checkpoint import StateDictMismatchError, load_state_dict_flexible
from tests.helpers.checkpoint_support import ModuleNextToAParameter, TinyModule, make_net
from tests.helpers.programs import PROGRAMS

Wrap = Callable[[nn.Module], nn.Module]

WRAPS: dict[str, Wrap] = {
    "plain": lambda m: m,
    "DataParallel": lambda m: nn.DataParallel(m),
    "compile": lambda m: torch.compile(m),
    "compile(DataParallel)": lambda m: torch.compile(nn.DataParallel(m)),
}


def trained_net() -> nn.Module:
    net = make_net()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))
    net.train()(torch.randn(8, 4, dtype=torch.float64))  # moves the BatchNorm's running stats
    return net


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        torch.testing.assert_close(va, vb, rtol=0, atol=0, msg=f"{ka} vs {kb}")


@pytest.mark.parametrize("source", WRAPS)
@pytest.mark.parametrize("target", WRAPS)
def test_every_wrapped_form_loads_into_every_wrapped_form(source: str, target: str) -> None:
    net = trained_net()
    fresh = make_net()
    report = load_state_dict_flexible(WRAPS[target](fresh), WRAPS[source](net).state_dict())
    assert_same_weights(fresh, net)
    assert bool(report.mapping) == (source != target)


def test_network_weights_load_into_the_lightning_module_and_back() -> None:
    net = trained_net()
    module = TinyModule(wrap="dp")
    report = load_state_dict_flexible(module, torch.compile(net).state_dict())
    assert report.added_prefix == "model."
    assert report.mapping["_orig_mod.0.weight"] == "model.module.0.weight"
    assert_same_weights(module.model.module, net)

    back = make_net()
    report = load_state_dict_flexible(nn.DataParallel(back), module.state_dict())
    assert report.removed_prefix == "model."
    assert_same_weights(back, net)


@pytest.mark.slow
def test_ddp_state_dict_from_two_gloo_processes_loads(tmp_path: Path) -> None:
    out = tmp_path / "ddp.pt"
    script = PROGRAMS / "checkpoint_ddp_save.py"
    ranks = [
        subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"), str(out)])
        for r in range(2)
    ]
    assert [p.wait(timeout=60) for p in ranks] == [0, 0]
    saved = torch.load(out, weights_only=True)
    assert next(iter(saved)).startswith("module.")
    fresh = make_net()
    with torch.no_grad():
        fresh[0].weight.zero_()
    load_state_dict_flexible(fresh, saved)
    torch.testing.assert_close(fresh[0].weight, saved["module.0.weight"])


def test_shape_mismatch_names_key_and_both_shapes() -> None:
    state = nn.DataParallel(make_net()).state_dict()
    state["module.3.weight"] = torch.zeros(5, 8, dtype=torch.float64)
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_flexible(make_net(), state, strict=False)
    assert "3.weight: (2, 8) vs (5, 8)" in str(err.value)
    assert err.value.shapes == [("3.weight", (2, 8), (5, 8))]


def test_missing_and_unexpected_keys_are_listed_together() -> None:
    state = dict(nn.DataParallel(make_net()).state_dict())
    del state["module.0.bias"]
    state["module.extra.weight"] = torch.zeros(1)
    with pytest.raises(StateDictMismatchError) as err:
        load_state_dict_flexible(make_net(), state)
    message = str(err.value)
    assert "Missing from the state dict (1):\n    0.bias" in message
    assert "Unexpected in the state dict (1):\n    module.extra.weight" in message


def test_not_strict_loads_what_matches_and_reports_the_rest() -> None:
    net = trained_net()
    state = dict(net.state_dict())
    del state["3.bias"]
    state["stray"] = torch.zeros(1)
    fresh = make_net()
    report = load_state_dict_flexible(fresh, state, strict=False)
    assert report.missing == ["3.bias"] and report.unexpected == ["stray"]
    torch.testing.assert_close(fresh[3].weight, net[3].weight)


def test_a_module_attribute_next_to_a_parameter_round_trips() -> None:
    source, fresh = ModuleNextToAParameter(), ModuleNextToAParameter()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    report = load_state_dict_flexible(fresh, source.state_dict())
    assert report.mapping == {}
    assert_same_weights(fresh, source)
    load_state_dict_flexible(fresh, nn.DataParallel(source).state_dict())  # a real wrapper still goes
    assert_same_weights(fresh, source)
