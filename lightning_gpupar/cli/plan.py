"""``gpupar-plan``: print the placement plan a Hydra config of the example app would train with, without
training, so that devices, ``max_memory`` and ``no_split`` can be tried before a run.

How it works: docs/internals.md, section ``lightning_gpupar/cli/plan.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from lightning_utilities.core.apply_func import apply_to_collection
from omegaconf import DictConfig

from lightning_gpupar.config import build_trainer
from lightning_gpupar.model_split.device_map import DEVICE_MAP
from lightning_gpupar.model_split.paths import find_submodule
from lightning_gpupar.model_split.plan import PlacementPlan, cuda_free_bytes
from lightning_gpupar.strategies.ddp_split import DDPSplitStrategy
from lightning_gpupar.strategies.model_split import ModelSplitStrategy
from lightning_gpupar.strategies.split_mixin import planning_inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpupar-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. strategy=model_split")
    parser.add_argument("--config-dir", default="conf", help="the app's config directory (default: ./conf)")
    parser.add_argument("--config-name", default="config", help="the primary config (default: config)")
    parser.add_argument("--no-data", action="store_true", help="do not load a batch to measure activations")
    parser.add_argument(
        "--device-map",
        metavar="JSON",
        help="plan placement='device_map' from this hf_device_map (a JSON object, or a .json file), e.g. "
        "the one from_pretrained(device_map=...) left on a model",
    )
    parser.add_argument(
        "--device-map-of",
        metavar="PATH",
        default="",
        help="the submodule the device map's keys are relative to (default: the LightningModule)",
    )
    args = parser.parse_args(argv)
    config_dir = Path(args.config_dir).resolve()
    if not config_dir.is_dir():
        parser.error(f"--config-dir {args.config_dir}: no such directory (run from the app's root)")
    cfg = compose_config(config_dir, args.config_name, args.overrides)
    device_map = _read_device_map(parser, args.device_map) if args.device_map else None
    plan = plan_for_config(
        cfg, use_data=not args.no_data, device_map=device_map, device_map_of=args.device_map_of
    )
    print(plan.table(cuda_free_bytes))
    return 0


def compose_config(config_dir: Path, config_name: str, overrides: list[str]) -> DictConfig:
    """The app's config as ``examples/train.py`` composes it (its schemas registered when importable)."""
    root = str(config_dir.parent)
    if root not in sys.path:
        sys.path.insert(0, root)  # the config's targets (``examples.models...``) import from there
    with contextlib.suppress(ImportError):
        importlib.import_module("examples.schema").register_app_configs()
    with initialize_config_dir(config_dir=str(config_dir), version_base="1.3"):
        return compose(config_name, overrides=overrides)


def _read_device_map(parser: argparse.ArgumentParser, text: str) -> dict[str, Any]:
    """``--device-map``: inline JSON, or the path of a JSON file."""
    path = Path(text)
    try:
        found = json.loads(path.read_text() if path.suffix == ".json" and path.is_file() else text)
    except (OSError, json.JSONDecodeError) as err:
        parser.error(f"--device-map: not a JSON object or .json file ({err})")
    if not isinstance(found, dict):
        parser.error('--device-map: write a JSON object, e.g. \'{"model.embed": 0, "model.head": 1}\'')
    return found


def plan_for_config(
    cfg: DictConfig, use_data: bool = True, device_map: dict[str, Any] | None = None, device_map_of: str = ""
) -> PlacementPlan:
    """The plan the config's split strategy would apply to rank 0's model copy, built on the meta device;
    with ``device_map``, the plan of that ``hf_device_map`` set on the submodule ``device_map_of``."""
    trainer = build_trainer(
        cfg, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    strategy = trainer.strategy
    if isinstance(strategy, DDPSplitStrategy):
        devices = list(strategy.node_devices or [])[: strategy.devices_per_process]
    elif isinstance(strategy, ModelSplitStrategy):
        devices = strategy.devices
    else:
        raise SystemExit(
            f"gpupar-plan: strategy {type(strategy).__name__} places no submodules; choose "
            "strategy=model_split or strategy=ddp_split."
        )
    with torch.device("meta"):
        model = instantiate(cfg.model, _convert_="all")
    split = strategy.split
    if device_map is not None:
        setattr(find_submodule(model, device_map_of), "hf_device_map", device_map)  # noqa: B010
        split = dataclasses.replace(split, placement=DEVICE_MAP)
    inputs = planning_inputs(model)
    if inputs["example_input"] is None and use_data and "data" in cfg:
        inputs["example_input"] = _first_input(cfg)
    return split.plan(model, devices, **inputs)


def _first_input(cfg: DictConfig) -> Any:
    """The first element of the first training batch (what the example models' forward takes)."""
    data = instantiate(cfg.data)
    data.prepare_data()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    first = batch[0] if isinstance(batch, list | tuple) else batch
    return apply_to_collection(first, torch.Tensor, lambda t: t.to("meta"))


if __name__ == "__main__":
    raise SystemExit(main())
