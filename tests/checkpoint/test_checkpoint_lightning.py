"""The NormalizeCheckpointKeys callback and CanonicalCheckpointMixin inside real Lightning runs."""

from __future__ import annotations

from argparse import Namespace
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar import NormalizeCheckpointKeys
from lightning_gpupar.checkpoint import (
    AtomicCheckpointIO,
    CanonicalCheckpointMixin,
    CheckpointError,
    StateDictMismatchError,
    UnsafeCheckpointError,
    load_checkpoint_file,
)
from tests.helpers.checkpoint_support import TinyModule, loader, make_net, quiet_trainer_kwargs


class CanonicalSingle(CanonicalCheckpointMixin, SingleDeviceStrategy):
    pass


class CanonicalDDP(CanonicalCheckpointMixin, DDPStrategy):
    pass


def fit(tmp_path: Path, module: pl.LightningModule, **kwargs: object) -> pl.Trainer:
    trainer = pl.Trainer(**{**quiet_trainer_kwargs(tmp_path), "max_epochs": 1, **kwargs})  # type: ignore[arg-type]
    trainer.fit(module, loader())
    return trainer


def test_callback_writes_canonical_keys_even_for_weights_only_saves(tmp_path: Path) -> None:
    every = ModelCheckpoint(tmp_path / "full", save_last=True, monitor="train_loss")
    weights = ModelCheckpoint(tmp_path / "weights", save_weights_only=True, save_last=True)
    fit(
        tmp_path,
        TinyModule(wrap="dp"),
        enable_checkpointing=True,
        callbacks=[NormalizeCheckpointKeys(), every, weights],
    )
    for path in (tmp_path / "full/last.ckpt", tmp_path / "weights/last.ckpt"):
        keys = list(load_checkpoint_file(path)["state_dict"])
        assert keys == [f"model.{k}" for k in make_net().state_dict()], path


def test_callback_resumes_a_wrapped_checkpoint_into_a_plain_module(tmp_path: Path) -> None:
    first = fit(tmp_path, TinyModule(wrap="dp"))  # Lightning's own save: keys keep "model.module."
    first.save_checkpoint(tmp_path / "wrapped.ckpt")
    assert "model.module.0.weight" in load_checkpoint_file(tmp_path / "wrapped.ckpt")["state_dict"]

    plain = TinyModule()
    trainer = pl.Trainer(
        **quiet_trainer_kwargs(tmp_path), max_epochs=2, callbacks=[NormalizeCheckpointKeys()]
    )
    trainer.fit(plain, loader(), ckpt_path=tmp_path / "wrapped.ckpt")
    assert trainer.global_step == 8  # 4 restored + 4 trained

    without = pl.Trainer(**quiet_trainer_kwargs(tmp_path), max_epochs=2)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # what the callback saves users from
        without.fit(TinyModule(), loader(), ckpt_path=tmp_path / "wrapped.ckpt")


def test_callback_reports_a_real_mismatch_readably(tmp_path: Path) -> None:
    fit(tmp_path, TinyModule()).save_checkpoint(tmp_path / "a.ckpt")
    other = TinyModule()
    other.model[3] = torch.nn.Linear(8, 3).double()
    trainer = pl.Trainer(
        **quiet_trainer_kwargs(tmp_path), max_epochs=2, callbacks=[NormalizeCheckpointKeys()]
    )
    with pytest.raises(StateDictMismatchError, match=r"model.3.weight: \(3, 8\) vs \(2, 8\)"):
        trainer.fit(other, loader(), ckpt_path=tmp_path / "a.ckpt")


def test_mixin_saves_canonical_and_loads_any_wrapped_form(tmp_path: Path) -> None:
    strategy = CanonicalSingle(device=torch.device("cpu"))
    trainer = fit(tmp_path, TinyModule(wrap="dp"), strategy=strategy)
    assert isinstance(strategy.checkpoint_io, AtomicCheckpointIO)
    trainer.save_checkpoint(tmp_path / "c.ckpt")
    assert "model.0.weight" in load_checkpoint_file(tmp_path / "c.ckpt")["state_dict"]

    for module in (TinyModule(), TinyModule(wrap="dp")):
        again = pl.Trainer(
            **quiet_trainer_kwargs(tmp_path), max_epochs=2, strategy=CanonicalSingle(torch.device("cpu"))
        )
        again.fit(module, loader(), ckpt_path=tmp_path / "c.ckpt")
        assert again.global_step == 8


def test_mixin_composes_with_lightnings_ddp_and_keeps_a_users_io() -> None:
    assert isinstance(CanonicalDDP().checkpoint_io, AtomicCheckpointIO)
    mine = TorchCheckpointIO()
    assert CanonicalDDP(checkpoint_io=mine).checkpoint_io is mine
    trainer = pl.Trainer(accelerator="cpu", strategy=CanonicalSingle(torch.device("cpu")), plugins=[mine])
    assert trainer.strategy.checkpoint_io is mine  # a plugin is no conflict: our default is lazy


def test_a_file_without_state_dict_is_a_clear_error(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(1)}, tmp_path / "plain.pt")
    strategy = CanonicalSingle(torch.device("cpu"))
    trainer = pl.Trainer(**quiet_trainer_kwargs(tmp_path), max_epochs=1, strategy=strategy)
    with pytest.raises(CheckpointError, match="no 'state_dict' entry"):
        trainer.fit(TinyModule(), loader(), ckpt_path=tmp_path / "plain.pt")


class Renamed(pl.LightningModule):
    """Its old checkpoints called ``encoder`` ``enc``; on_load_checkpoint migrates them."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Linear(2, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.encoder(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("enc.")]:
            state["encoder." + key.removeprefix("enc.")] = state.pop(key)


def test_callback_leaves_the_modules_own_key_migration_room(tmp_path: Path) -> None:
    data = DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)
    options: dict[str, Any] = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    trainer = pl.Trainer(max_steps=1, enable_checkpointing=False, **options)
    trainer.fit(Renamed(), data)
    trainer.save_checkpoint(tmp_path / "new.ckpt")
    old = torch.load(tmp_path / "new.ckpt", weights_only=False)
    old["state_dict"] = {k.replace("encoder.", "enc."): v for k, v in old["state_dict"].items()}
    torch.save(old, tmp_path / "old.ckpt")
    resumed = Renamed()
    pl.Trainer(max_steps=2, callbacks=[NormalizeCheckpointKeys()], enable_checkpointing=False, **options).fit(
        resumed, data, ckpt_path=tmp_path / "old.ckpt"
    )
    assert resumed.trainer.global_step == 2


class LoneModule(pl.LightningModule):
    """Its only child is an attribute named ``module``: a name, not a wrapper."""

    def __init__(self) -> None:
        super().__init__()
        self.module = torch.nn.DataParallel(torch.nn.Linear(2, 1))  # a real wrapper inside, too

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.module(batch[0]).sum()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize(
    "options",
    [{"strategy": "dp", "devices": 2}, {"devices": 1, "callbacks": [NormalizeCheckpointKeys()]}],
    ids=["mixin", "callback"],
)
def test_saving_removes_real_wrappers_only(tmp_path: Path, options: dict[str, Any]) -> None:
    data = DataLoader(TensorDataset(torch.ones(4, 2)), batch_size=2)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=1,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        **options,
    )
    trainer.fit(LoneModule(), data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    keys = list(torch.load(tmp_path / "run.ckpt", weights_only=True)["state_dict"])
    assert keys == ["module.weight", "module.bias"]  # the attribute stays, DataParallel's `module.` goes


@pytest.mark.parametrize("strategy", ["dp", "model_split"])
def test_a_module_attribute_next_to_a_parameter_resumes_under_our_strategies(
    tmp_path: Path, strategy: str
) -> None:
    options = {"strategy": strategy, "accelerator": "cpu", "devices": 2}
    fit(tmp_path, TinyModule(wrap="attribute"), **options).save_checkpoint(tmp_path / "a.ckpt")
    keys = list(load_checkpoint_file(tmp_path / "a.ckpt")["state_dict"])
    assert keys == ["model.bias", "model.module.weight", "model.module.bias"]
    again = pl.Trainer(**quiet_trainer_kwargs(tmp_path), max_epochs=2, **options)  # type: ignore[arg-type]
    again.fit(TinyModule(wrap="attribute"), loader(), ckpt_path=tmp_path / "a.ckpt")
    assert again.global_step == 8  # 4 restored + 4 trained


def test_dp_refuses_an_unsafe_checkpoint_unless_the_user_opts_in(tmp_path: Path) -> None:
    options = {"strategy": "dp", "accelerator": "cpu", "devices": 2}
    fit(tmp_path, TinyModule(), **options).save_checkpoint(tmp_path / "a.ckpt")
    checkpoint = torch.load(tmp_path / "a.ckpt", weights_only=True)
    checkpoint["extra"] = Namespace(note="any class: rebuilding it needs full unpickling")
    torch.save(checkpoint, tmp_path / "unsafe.ckpt")

    refused = pl.Trainer(**quiet_trainer_kwargs(tmp_path), max_epochs=2, **options)  # type: ignore[arg-type]
    with pytest.raises(UnsafeCheckpointError) as err:
        refused.fit(TinyModule(), loader(), ckpt_path=tmp_path / "unsafe.ckpt")
    message = str(err.value)
    assert "argparse.Namespace" in message and "arbitrary code" in message
    assert "weights_only=False" in message and "--unsafe-unpickle" in message

    trusted = pl.Trainer(**quiet_trainer_kwargs(tmp_path), max_epochs=2, **options)  # type: ignore[arg-type]
    trusted.fit(TinyModule(), loader(), ckpt_path=tmp_path / "unsafe.ckpt", weights_only=False)
    assert trusted.global_step == 8  # 4 restored + 4 trained
