"""Each model-split option is defined once (``ModelSplit``'s fields); every other place follows that list.

``ModelSplitStrategy``'s typed signature (what LightningCLI and IDEs read) and the YAML files are checked
against it; the Hydra schema and ``DDPSplitStrategy``'s options are made from it.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import yaml

from lightning_gpupar.config import DDPSplitStrategyConfig, DDPStrategyConfig, ModelSplitFields
from lightning_gpupar.model_split import ModelSplit
from lightning_gpupar.strategies.ddp import DEFAULT_TIMEOUT_S, DDPStrategy
from lightning_gpupar.strategies.ddp_split import DDPSplitStrategy
from lightning_gpupar.strategies.model_split import ModelSplitStrategy

CONF = Path(__file__).resolve().parents[2] / "conf" / "strategy"
OPTIONS = list(ModelSplit.option_names())


def _parameters(cls: type) -> list[str]:
    return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]


def test_the_one_list_is_modelsplits_fields() -> None:
    assert [field.name for field in dataclasses.fields(ModelSplit)] == OPTIONS
    assert {"placement", "chunks", "stages", "max_memory", "balance"} <= set(OPTIONS)


def test_model_split_strategy_takes_exactly_the_split_options_in_one_order() -> None:
    assert _parameters(ModelSplitStrategy)[: len(OPTIONS)] == OPTIONS
    assert not set(OPTIONS) & set(_parameters(DDPStrategy))


def test_ddp_split_takes_every_split_option_by_keyword_and_passes_the_rest_to_ddp() -> None:
    given = {name: dataclasses.replace(ModelSplit()).__dict__[name] for name in OPTIONS}
    given |= {"chunks": 2, "balance": "time", "no_split": ["Linear"]}
    strategy = DDPSplitStrategy(devices_per_process=2, find_unused_parameters=True, **given)
    assert [getattr(strategy.split, name) for name in OPTIONS] == [given[name] for name in OPTIONS]
    assert strategy._ddp_kwargs == {
        "find_unused_parameters": True,
        "static_graph": False,
        "gradient_as_bucket_view": False,
    }


def test_the_hydra_schema_and_yaml_files_name_the_same_options() -> None:
    assert [field.name for field in dataclasses.fields(ModelSplitFields)] == OPTIONS
    assert set(OPTIONS) <= {field.name for field in dataclasses.fields(DDPSplitStrategyConfig)}
    model_split_yaml = yaml.safe_load((CONF / "model_split.yaml").read_text())
    assert [key for key in model_split_yaml if key in OPTIONS] == OPTIONS
    ddp_split_yaml = yaml.safe_load((CONF / "ddp_split.yaml").read_text())
    unknown = set(ddp_split_yaml) - {f.name for f in dataclasses.fields(DDPStrategyConfig)} - set(OPTIONS)
    assert unknown <= {"defaults", "devices_per_process"}


def test_the_defaults_agree_with_the_classes() -> None:
    split_defaults = {f.name: f.default for f in dataclasses.fields(ModelSplit)}
    signature = inspect.signature(ModelSplitStrategy.__init__).parameters
    schema = {f.name: f.default for f in dataclasses.fields(ModelSplitFields)}
    for name in OPTIONS:
        given = signature[name].default
        assert given == split_defaults[name] or (given is None and split_defaults[name] in ((), "auto")), name
        assert schema[name] in (split_defaults[name], None), name
    ddp_timeout = inspect.signature(DDPStrategy.__init__).parameters["timeout"].default
    assert ddp_timeout == DEFAULT_TIMEOUT_S == DDPStrategyConfig.timeout
    for name in ("ddp.yaml", "ddp_split.yaml"):
        assert yaml.safe_load((CONF / name).read_text())["timeout"] == DEFAULT_TIMEOUT_S
