"""Adapters out of a LoRA run: ``gpupar-ckpt export --trainable-only`` writes only the tensors that
train, under PEFT's keys with ``adapter_config.json`` beside them, and PEFT loads them
(``PeftModel.from_pretrained``, ``set_peft_model_state_dict``); the full checkpoint of a LoRA run resumes
under every other strategy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch

from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.checkpoint import load_checkpoint_file
from lightning_gpupar.cli.ckpt import main
from tests.helpers.lora import LoraLM, causal_lm, token_loader, trainable_weights
from tests.helpers.programs.in_process import in_process_ddp
from tests.helpers.trainer import TRAINING_ONLY

peft = pytest.importorskip("peft")
safetensors = pytest.importorskip("safetensors.torch")


def fit(module: LoraLM, epochs: int, ckpt_path: Path | None = None, **trainer: Any) -> pl.Trainer:
    """``epochs`` epochs of 2 steps each."""
    options: dict[str, Any] = {**TRAINING_ONLY, "accelerator": "cpu", "max_epochs": epochs}
    options.update(trainer)
    t = pl.Trainer(**options)
    t.fit(module, token_loader(), ckpt_path=ckpt_path)
    return t


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LoraLM]:
    """Two steps (one epoch) of a LoRA run under model_split over 2 CPU devices, and its checkpoint."""
    tmp = tmp_path_factory.mktemp("lora")
    module = LoraLM(layers=2)
    trainer = fit(module, 1, strategy="model_split", devices=2)
    trainer.save_checkpoint(tmp / "run.ckpt")
    return tmp / "run.ckpt", module


def fresh_base() -> torch.nn.Module:
    torch.manual_seed(0)
    return causal_lm(layers=2)


@pytest.mark.parametrize("file_format", ["safetensors", "pt"])
def test_trainable_only_export_is_the_adapter_peft_loads(
    lora_run: tuple[Path, LoraLM], tmp_path: Path, file_format: str
) -> None:
    ckpt, module = lora_run
    out = tmp_path / "adapter"
    args = [
        "export",
        str(ckpt),
        str(out),
        "--submodule",
        "model",
        "--trainable-only",
        "--format",
        file_format,
    ]
    assert main(args) == 0
    name = {"safetensors": "adapter_model.safetensors", "pt": "adapter_model.bin"}[file_format]
    assert sorted(p.name for p in out.iterdir()) == sorted(["adapter_config.json", name])
    if file_format == "safetensors":
        saved = safetensors.load_file(out / name)
    else:
        saved = torch.load(out / name, weights_only=True)
    trained = trainable_weights(module)
    assert len(saved) == len(trained) > 0  # only the adapters: no base weight
    assert all(".lora_" in k and ".default." not in k for k in saved)  # PEFT's keys, no adapter name

    loaded = peft.PeftModel.from_pretrained(fresh_base(), out, is_trainable=True)
    assert loaded.peft_config["default"].r == module.model.peft_config["default"].r
    for key, value in trained.items():
        torch.testing.assert_close(loaded.get_parameter(key.removeprefix("model.")).detach(), value)

    target = peft.get_peft_model(fresh_base(), module.model.peft_config["default"])
    result = peft.set_peft_model_state_dict(target, saved)
    assert not result.unexpected_keys
    for key, value in trained.items():
        torch.testing.assert_close(target.get_parameter(key.removeprefix("model.")).detach(), value)


def test_trainable_only_without_submodule_keeps_the_lightning_modules_keys(
    lora_run: tuple[Path, LoraLM], tmp_path: Path
) -> None:
    ckpt, module = lora_run
    assert main(["export", str(ckpt), str(tmp_path / "t.pt"), "--trainable-only"]) == 0
    saved = torch.load(tmp_path / "t.pt", weights_only=True)
    assert saved.keys() == trainable_weights(module).keys()
    assert not (tmp_path / "adapter_config.json").exists()  # the LightningModule is no PeftModel


def test_a_checkpoint_that_does_not_say_what_trains_is_refused(
    lora_run: tuple[Path, LoraLM], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, _ = lora_run
    plain = tmp_path / "plain.pt"
    torch.save(load_checkpoint_file(ckpt)["state_dict"], plain)
    assert main(["export", str(plain), str(tmp_path / "out"), "--trainable-only"]) == 1
    assert "does not say which tensors train" in capsys.readouterr().err


#: A manual map: embedding and the first layer on 0, the rest (and the rotary embedding's buffer) on 1.
DECODER = "model.base_model.model.model"
MAP = {f"{DECODER}.embed_tokens": 0, f"{DECODER}.layers.0": 0, f"{DECODER}.layers.1": 1}

RESUME = {
    "single": lambda: {"devices": 1},
    "dp": lambda: {"strategy": "dp", "devices": 2},
    "model_split_map": lambda: {"strategy": ModelSplitStrategy(MAP, default_device=1), "devices": 2},
    "ddp_split": lambda: in_process_ddp(devices_per_process=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("strategy", sorted(RESUME))
def test_a_lora_runs_full_checkpoint_resumes_under_another_strategy(
    lora_run: tuple[Path, LoraLM], strategy: str
) -> None:
    ckpt, _ = lora_run
    resumed = LoraLM(layers=2, seed=1)  # other initial weights: the checkpoint must set every one
    fit(resumed, 2, ckpt_path=ckpt, **RESUME[strategy]())
    straight = LoraLM(layers=2)
    fit(straight, 2)
    for key, value in trainable_weights(straight).items():
        torch.testing.assert_close(trainable_weights(resumed)[key], value, rtol=1e-10, atol=1e-12)
