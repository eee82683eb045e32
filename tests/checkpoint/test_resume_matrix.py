"""Train under strategy X, resume under Y (``trainer.fit(ckpt_path=...)``), for every pair.

The weights after resuming must equal two uninterrupted halves under one device. Adding a strategy
is one line in ``STRATEGIES``: a name and the Trainer arguments that select it.

The network (:class:`~tests.helpers.checkpoint_support.ChainNet`) holds each block inside ``nn.DataParallel``,
so every checkpoint would carry ``module.`` segments without our normalisation, and every resume loads
canonical keys into a wrapped module. ``SOURCES`` adds checkpoints written by plain Lightning from a
module whose whole network sits in ``nn.DataParallel`` (``model.module.`` keys), resumed under each
strategy.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.checkpoint import load_checkpoint_file, normalize_state_dict
from tests.helpers.checkpoint_support import ChainModule, app_trainer_kwargs, loader, quiet_trainer_kwargs
from tests.helpers.programs.in_process import in_process_ddp

pytestmark = pytest.mark.slow  # every pair trains, saves and resumes a Trainer end to end

#: The TransformerNet example's manual placement, on the matrix's network.
PLACEMENT = {"model.embed": 0, "model.blocks.0-1": 0, "model.blocks.2-3": 1, "model.head": 1}

STRATEGIES: dict[str, Callable[[], dict[str, Any]]] = {
    "single": lambda: app_trainer_kwargs("strategy=single", "trainer.accelerator=cpu"),  # as the app
}
STRATEGIES["dp"] = lambda: {"strategy": "dp", "accelerator": "cpu", "devices": 2}
STRATEGIES["model_split"] = lambda: {"strategy": "model_split", "accelerator": "cpu", "devices": 2}
STRATEGIES["model_split_pipe"] = lambda: {
    "strategy": ModelSplitStrategy(PLACEMENT, chunks=2),
    "accelerator": "cpu",
    "devices": 2,
}
STRATEGIES["ddp"] = in_process_ddp  # DDPStrategy, one rank in this process (tests/ddp_programs/in_process.py)
STRATEGIES["ddp_split"] = lambda: in_process_ddp(devices_per_process=2)  # one rank, model over 2 devices

#: Checkpoints to resume from: one per strategy, and Lightning's own from a wrapped network.
PLAIN_LIGHTNING = "lightning_model.module"
SOURCES = [*STRATEGIES, PLAIN_LIGHTNING]

HALF = 2  # epochs before the checkpoint, and after it
PAIRS = list(itertools.product(SOURCES, STRATEGIES))
#: The keys every checkpoint must hold: the network's own, without the blocks' ``module.``.
CANONICAL = [k.replace(".module.", ".") for k in ChainModule().state_dict()]


def train(tmp: Path, name: str, epochs: int, ckpt_path: Path | None = None) -> pl.Trainer:
    if name == PLAIN_LIGHTNING:
        module, options = ChainModule(wrap="dp"), {"accelerator": "cpu", "devices": 1}
    else:
        module, options = ChainModule(), STRATEGIES[name]()
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp), max_epochs=epochs, **options)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return trainer


@pytest.fixture(scope="module")
def halfway(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One checkpoint per source, written after the first half."""
    paths = {}
    for name in SOURCES:
        tmp = tmp_path_factory.mktemp(f"first-{name}")
        train(tmp, name, HALF).save_checkpoint(tmp / "half.ckpt")
        paths[name] = tmp / "half.ckpt"
    return paths


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, torch.Tensor]:
    trainer = train(tmp_path_factory.mktemp("reference"), "single", 2 * HALF)
    return dict(normalize_state_dict(trainer.lightning_module.state_dict()))


def test_the_matrix_network_carries_wrapper_segments() -> None:
    keys = list(ChainModule().state_dict())
    assert "model.blocks.0.module.0.weight" in keys and keys != CANONICAL
    assert "model.module.blocks.0.module.0.weight" in ChainModule(wrap="dp").state_dict()


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_checkpoints_hold_canonical_keys(halfway: dict[str, Path], name: str) -> None:
    keys = list(load_checkpoint_file(halfway[name])["state_dict"])
    assert keys == CANONICAL
    assert "model.blocks.0.0.weight" in keys


def test_plain_lightning_keeps_the_wrapper_segments(halfway: dict[str, Path]) -> None:
    keys = list(load_checkpoint_file(halfway[PLAIN_LIGHTNING])["state_dict"])
    assert keys[0].startswith("model.module.") and "model.module.blocks.0.module.0.weight" in keys


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
