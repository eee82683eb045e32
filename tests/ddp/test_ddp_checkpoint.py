"""A checkpoint written by two real DDP processes resumes in one process under another strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from tests.helpers.programs import python, run_bounded
from tests.helpers.programs.tiny_fit import Tiny, make_data


class WeightsAtTrainStart(pl.Callback):
    """The module's weights once the checkpoint is restored, before the first resumed step."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


@pytest.mark.slow
def test_two_ddp_processes_save_and_dp_resumes_the_same_weights(tmp_path: Path) -> None:
    ckpt = tmp_path / "ddp.ckpt"
    finished = run_bounded(
        python("tiny_fit.py", "--devices", "2", "--out", str(tmp_path), "--ckpt", str(ckpt)),
        timeout=120,
        cwd=tmp_path,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    saved: dict[str, Any] = torch.load(ckpt, map_location="cpu", weights_only=True)
    trained = torch.load(tmp_path / "weights.pt", map_location="cpu", weights_only=True)
    assert list(saved["state_dict"]) == list(Tiny().state_dict()) == ["net.weight", "net.bias"]
    for key, value in trained.items():
        torch.testing.assert_close(saved["state_dict"][key], value, rtol=0, atol=0)

    seen = WeightsAtTrainStart()
    resumed = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="dp",
        max_epochs=saved["epoch"] + 2,
        limit_train_batches=2,
        callbacks=[seen],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    resumed.fit(Tiny(), make_data(), ckpt_path=ckpt)
    assert resumed.global_step > saved["global_step"]  # it went on training from there
    assert list(seen.weights) == list(trained)
    for key, value in trained.items():
        torch.testing.assert_close(seen.weights[key], value, rtol=0, atol=0)
