"""Train under strategy X, resume under Y (``trainer.fit(ckpt_path=...)``), for every pair.

The weights after resuming must equal two uninterrupted halves under one device. Adding a strategy
is one line in ``STRATEGIES``: a name and the Trainer arguments that select it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_gpupar import NormalizeCheckpointKeys
from lightning_gpupar.checkpoint import load_checkpoint_file, normalize_state_dict
from tests.checkpoint_support import TinyModule, loader, quiet_trainer_kwargs
from tests.ddp_programs.in_process import in_process_ddp

STRATEGIES: dict[str, Callable[[], dict[str, Any]]] = {
    "single": lambda: {"accelerator": "cpu", "devices": 1, "callbacks": [NormalizeCheckpointKeys()]},
}
STRATEGIES["dp"] = lambda: {"strategy": "dp", "accelerator": "cpu", "devices": 2}
STRATEGIES["model_split"] = lambda: {"strategy": "model_split", "accelerator": "cpu", "devices": 2}
STRATEGIES["ddp"] = in_process_ddp  # DDPStrategy, one rank in this process (tests/ddp_programs/in_process.py)
STRATEGIES["ddp_split"] = lambda: in_process_ddp(devices_per_process=2)  # one rank, model over 2 devices

HALF = 2  # epochs before the checkpoint, and after it
PAIRS = list(itertools.product(STRATEGIES, repeat=2))


def train(tmp: Path, name: str, epochs: int, ckpt_path: Path | None = None) -> pl.Trainer:
    module = TinyModule(wrap="dp" if name == "single" else None, batchnorm=False)
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp), max_epochs=epochs, **STRATEGIES[name]())
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def halfway(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint per strategy, written after the first half."""
    paths = {}
    for name in STRATEGIES:
        tmp = tmp_path_factory.mktemp(f"first-{name}")
        train(tmp, name, HALF).save_checkpoint(tmp / "half.ckpt")
        paths[name] = tmp / "half.ckpt"
    return paths


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    trainer = train(tmp_path_factory.mktemp("reference"), "single", 2 * HALF)
    return dict(normalize_state_dict(trainer.lightning_module.state_dict()))


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_checkpoints_hold_canonical_keys(halfway: dict[str, Path], name: str) -> None:
    keys = list(load_checkpoint_file(halfway[name])["state_dict"])
    assert keys == ["model.0.weight", "model.0.bias", "model.3.weight", "model.3.bias"]


@pytest.mark.parametrize(("first", "second"), PAIRS, ids=[f"{a}-then-{b}" for a, b in PAIRS])
def test_resume_under_another_strategy_continues_the_same_training(
    tmp_path: Path,
    halfway: dict[str, Path],
    uninterrupted: dict[str, torch.Tensor],
    first: str,
    second: str,
) -> None:
    trainer = train(tmp_path, second, 2 * HALF, ckpt_path=halfway[first])
    assert trainer.global_step == 2 * HALF * len(loader())
    resumed = normalize_state_dict(trainer.lightning_module.state_dict())
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=1e-10, atol=1e-12, msg=key)
