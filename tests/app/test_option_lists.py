"""Each model-split option is defined once (``ModelSplit``'s fields); every other list of them must agree.

The strategies' constructors, the Hydra schema, ``DDPStrategy``'s refusal list and the YAML files name the
same options; a new option added in one place and forgotten in another fails here.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import yaml

from lightning_gpupar.config import DDPStrategyConfig, ModelSplitFields
from lightning_gpupar.model_split import ModelSplit
from lightning_gpupar.strategies.ddp import DEFAULT_TIMEOUT_S, SPLIT_OPTIONS, DDPStrategy
from lightning_gpupar.strategies.ddp_split import DDPSplitStrategy
from lightning_gpupar.strategies.model_split import ModelSplitStrategy

CONF = Path(__file__).resolve().parents[2] / "conf" / "strategy"
OPTIONS = [field.name for field in dataclasses.fields(ModelSplit)]


def _parameters(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def test_the_strategies_take_exactly_the_split_options_in_one_order() -> None:
    model_split = _parameters(ModelSplitStrategy)
    assert model_split[: len(OPTIONS)] == OPTIONS
    ddp_split = _parameters(DDPSplitStrategy)
    assert [p for p in ddp_split if p in OPTIONS] == OPTIONS
    assert list(SPLIT_OPTIONS) == OPTIONS
    assert not set(OPTIONS) & set(_parameters(DDPStrategy))


def test_the_hydra_schema_and_yaml_files_name_the_same_options() -> None:
    assert [field.name for field in dataclasses.fields(ModelSplitFields)] == OPTIONS
    model_split_yaml = yaml.safe_load((CONF / "model_split.yaml").read_text())
    assert [key for key in model_split_yaml if key in OPTIONS] == OPTIONS
    ddp_split_yaml = yaml.safe_load((CONF / "ddp_split.yaml").read_text())
    unknown = set(ddp_split_yaml) - {f.name for f in dataclasses.fields(DDPStrategyConfig)} - set(OPTIONS)
    assert unknown <= {"defaults", "devices_per_process"}


def test_the_defaults_agree_with_the_classes() -> None:
    split_defaults = {f.name: f.default for f in dataclasses.fields(ModelSplit)}
    signature = inspect.signature(ModelSplitStrategy.__init__).parameters
    for name in OPTIONS:
        given = signature[name].default
        assert given == split_defaults[name] or (given is None and split_defaults[name] in ((), "auto")), name
    ddp_timeout = inspect.signature(DDPStrategy.__init__).parameters["timeout"].default
    assert ddp_timeout == DEFAULT_TIMEOUT_S == DDPStrategyConfig.timeout
    for name in ("ddp.yaml", "ddp_split.yaml"):
        assert yaml.safe_load((CONF / name).read_text())["timeout"] == DEFAULT_TIMEOUT_S
