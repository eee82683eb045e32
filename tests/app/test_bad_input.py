"""Every bad input a user can give gets an error before training that names it, what is valid, and a fix.

One table, four kinds of rows: Hydra app overrides (composed as ``examples/train.py`` would, then the
app's checks and ``build_trainer``, the steps before ``trainer.fit``), launch variables in the environment,
Python API constructors, and the CLIs. Each row asserts the exception type (or exit status) and a phrase
of the message. A handful of rows run the real app as a subprocess, to see the exit status and message a
user sees.
"""

from __future__ import annotations

import argparse
import os
import pickle
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.distributed
from hydra.errors import ConfigCompositionException, InstantiationException
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from examples.checks import AppConfigError, validate_app_config
from lightning_gpupar import DataParallelStrategy, DDPSplitStrategy, DDPStrategy, ModelSplitStrategy
from lightning_gpupar.cli import ckpt, devices
from lightning_gpupar.config import build_trainer
from lightning_gpupar.config.checks import ConfigValueError
from lightning_gpupar.ddp.checks import DDPConfigError
from lightning_gpupar.ddp.launcher import DDPLaunchError
from lightning_gpupar.devices import AUTO_IDS_ENV, DeviceSelectionError, GPUInfo, resolve_devices
from lightning_gpupar.model_split import PlacementError

ROOT = Path(__file__).resolve().parents[2]
#: Variables a launcher sets; cleared for every row, so a row sees only its own.
LAUNCH_ENV = (
    "MASTER_PORT",
    "MASTER_ADDR",
    "WORLD_SIZE",
    "RANK",
    "LOCAL_RANK",
    "NODE_RANK",
    "GROUP_RANK",
    "LOCAL_WORLD_SIZE",
    "CUDA_VISIBLE_DEVICES",
    "TORCHELASTIC_RUN_ID",
    "SLURM_NTASKS",
    AUTO_IDS_ENV,
)
DDP = ("strategy=ddp", "strategy.device_ids=2")
NO_MPI = pytest.mark.skipif(torch.distributed.is_mpi_available(), reason="this torch build has MPI")

# -- Hydra app overrides: (overrides, environment, fake GPUs' free GiB, exception type, phrase) -----------

APP_ROWS: list[Any] = [
    # the listed cases
    (["strategy.min_free_memory=10XB"], {}, (), DeviceSelectionError, "strategy.min_free_memory"),
    (["data.val_fraction=1.5"], {}, (), AppConfigError, "data.val_fraction=1.5"),
    (["trainer.num_nodes=2"], {}, (), ConfigValueError, "strategy=dp runs in one process"),
    ([*DDP], {"WORLD_SIZE": "junk"}, (), InstantiationException, "WORLD_SIZE='junk'"),
    (["strategy.cpu_fallback=0"], {}, (), DeviceSelectionError, "strategy.cpu_fallback"),
    (["strategy.output_device=banana"], {}, (), ValueError, "output_device='banana'"),
    ([*DDP], {"MASTER_PORT": "99999"}, (), InstantiationException, "MASTER_PORT='99999' is not a TCP port"),
    ([*DDP, "strategy.timeout=-1"], {}, (), InstantiationException, "strategy.timeout"),
    ([*DDP, "strategy.process_group_backend=nccl"], {}, (), ConfigValueError, "nccl moves CUDA tensors"),
    (
        [*DDP, "strategy.process_group_backend=banana"],
        {},
        (),
        InstantiationException,
        "not a torch.distributed",
    ),
    ([*DDP], {"MASTER_PORT": "garbage"}, (), InstantiationException, "MASTER_PORT='garbage'"),
    (["model=mlp", "data=tokens"], {}, (), AppConfigError, "model=mlp reads flat 64-feature digits"),
    (["data.batch_size=0"], {}, (), AppConfigError, "data.batch_size=0"),
    (["strategy=model_split", "strategy.max_memory={0:-5}"], {}, (), InstantiationException, "max_memory[0]"),
    (["trainer.accumulate_grad_batches=0"], {}, (), ConfigValueError, "trainer.accumulate_grad_batches=0"),
    # strategy and devices
    (["strategy=ddp", "strategy.min_free_memory=lots"], {}, (), DeviceSelectionError, "'lots'"),
    (["strategy.min_free_memory=-1GiB"], {}, (), DeviceSelectionError, "is not a size"),
    (["strategy=ddp", "strategy.cpu_fallback=-2"], {}, (), DeviceSelectionError, "must be an int >= 1"),
    (["strategy.output_device=-1"], {}, (), ValueError, "write a CUDA index >= 0"),
    (
        ["strategy.device_ids=2", "strategy.output_device=cuda:1"],
        {},
        (),
        ConfigValueError,
        "not one of the chosen",
    ),
    ([*DDP, "strategy.timeout=0"], {}, (), InstantiationException, "from 1 to 86400 (a day)"),
    ([*DDP, "strategy.timeout=0.001"], {}, (), InstantiationException, "timeout=0.001 (strategy.timeout)"),
    ([*DDP, "strategy.timeout=inf"], {}, (), InstantiationException, "timeout=inf (strategy.timeout)"),
    ([*DDP, "strategy.timeout=172800"], {}, (), InstantiationException, "timeout=172800.0 (strategy"),
    pytest.param(
        [*DDP, "strategy.process_group_backend=mpi"],
        {},
        (),
        InstantiationException,
        "has no mpi",
        marks=NO_MPI,
    ),
    ([*DDP, "strategy.process_group_backend='cpu:gloo,cuda:nope'"], {}, (), InstantiationException, "'nope'"),
    (
        ["strategy=ddp_split", "strategy.devices_per_process=0"],
        {},
        (),
        InstantiationException,
        ">= 2 devices",
    ),
    (["strategy=ddp_split", "strategy.device_ids=3"], {}, (), InstantiationException, "a multiple of 2"),
    (
        ["strategy=ddp_split", "strategy.device_ids=4", "strategy.placement={model.model:3}"],
        {},
        (),
        InstantiationException,
        "outside a process's own group",
    ),
    (["strategy=model_split", "strategy.chunks=0"], {}, (), InstantiationException, "chunks=0"),
    (["strategy=model_split", "strategy.placement=42"], {}, (), InstantiationException, "placement=42"),
    (["strategy=single", "strategy.device_ids=2"], {}, (), ValueError, "strategy=single runs on one device"),
    (["strategy=single", "trainer.num_nodes=2"], {}, (), ConfigValueError, "strategy=single runs in one"),
    (
        ["strategy=model_split", "trainer.num_nodes=3"],
        {},
        (),
        ConfigValueError,
        "strategy=model_split runs in one",
    ),
    (["strategy.device_ids=banana"], {}, (), DeviceSelectionError, "is not a device request"),
    (["strategy.device_ids=[]"], {}, (), DeviceSelectionError, "is empty"),
    (["strategy.device_ids=0"], {}, (), DeviceSelectionError, "a CPU device count must be >= 1"),
    (["strategy.device_ids=auto:0"], {}, (), DeviceSelectionError, "is not a device request"),
    (["strategy.device_ids=[0,3]"], {}, (), DeviceSelectionError, "CPU devices are counted"),
    (
        ["strategy.device_ids=[5]", "trainer.accelerator=auto"],
        {},
        (40, 40),
        DeviceSelectionError,
        "no GPU with id 5",
    ),
    (
        ["strategy.device_ids=[0,0]", "trainer.accelerator=auto"],
        {},
        (40, 40),
        DeviceSelectionError,
        "more than once",
    ),
    (
        ["strategy.device_ids=[-2]", "trainer.accelerator=auto"],
        {},
        (40, 40),
        DeviceSelectionError,
        "must be >= 0",
    ),
    (
        ["strategy.device_ids=3", "trainer.accelerator=auto"],
        {},
        (40, 40),
        DeviceSelectionError,
        "asks for 3 GPUs",
    ),
    (
        ["strategy.device_ids=auto:3", "trainer.accelerator=auto"],
        {},
        (40, 40, 0.5),
        DeviceSelectionError,
        "only 2",
    ),
    (["trainer.accelerator=gpu", "strategy.device_ids=auto"], {}, (), DeviceSelectionError, "no CUDA device"),
    (["trainer.accelerator=tpu"], {}, (), DeviceSelectionError, "Unknown accelerator 'tpu'"),
    (
        ["strategy.device_ids=cpu", "trainer.accelerator=gpu"],
        {},
        (40,),
        DeviceSelectionError,
        "the two disagree",
    ),
    # trainer
    (["trainer.accumulate_grad_batches=-1"], {}, (), ConfigValueError, "1 (no accumulation) or more"),
    (["trainer.gradient_clip_val=-1"], {}, (), ConfigValueError, "trainer.gradient_clip_val=-1"),
    (["trainer.num_sanity_val_steps=-2"], {}, (), ConfigValueError, "trainer.num_sanity_val_steps=-2"),
    (["trainer.log_every_n_steps=-1"], {}, (), ConfigValueError, "trainer.log_every_n_steps=-1"),
    (["trainer.deterministic=banana"], {}, (), ConfigValueError, "valid are null, true, false and warn"),
    (["trainer.deterministic=2"], {}, (), ConfigValueError, "trainer.deterministic=2"),
    (["trainer.num_nodes=0", *DDP], {}, (), InstantiationException, "`num_nodes` must be a positive integer"),
    (
        ["trainer.max_epochs=-5"],
        {},
        (),
        InstantiationException,
        "`max_epochs` must be a non-negative integer",
    ),
    (["trainer.max_steps=-5"], {}, (), InstantiationException, "`max_steps` must be a non-negative integer"),
    (["trainer.limit_train_batches=1.5"], {}, (), InstantiationException, "for limit_train_batches"),
    (["trainer.limit_val_batches=-1"], {}, (), InstantiationException, "for limit_val_batches"),
    (["trainer.precision=banana"], {}, (), InstantiationException, "Precision 'banana' is invalid"),
    # data
    (["data.val_fraction=0"], {}, (), AppConfigError, "strictly between 0 and 1"),
    (["data.test_fraction=-0.1"], {}, (), AppConfigError, "data.test_fraction=-0.1"),
    (["data.val_fraction=0.6", "data.test_fraction=0.5"], {}, (), AppConfigError, "leaving none to train on"),
    (["data.batch_size=-8"], {}, (), AppConfigError, "data.batch_size=-8"),
    (["model=transformer", "data.num_samples=0"], {}, (), AppConfigError, "data.num_samples=0"),
    (["model=transformer", "data.seq_len=0"], {}, (), AppConfigError, "data.seq_len=0"),
    (["model=transformer", "data.vocab_size=1"], {}, (), AppConfigError, "data.vocab_size=1"),
    # model, and model with data
    (["model.lr=0"], {}, (), AppConfigError, "the learning rate must be > 0"),
    (["model.lr=-0.1"], {}, (), AppConfigError, "model.lr=-0.1"),
    (["model.hidden=[0]"], {}, (), AppConfigError, "model.hidden=[0]"),
    (["model.num_classes=1"], {}, (), AppConfigError, "model.num_classes=1"),
    (["model.num_classes=5"], {}, (), AppConfigError, "the digits have 10 classes"),
    (["model.in_features=32"], {}, (), AppConfigError, "model.in_features=32"),
    (["model=cnn", "model.channels=0"], {}, (), AppConfigError, "model.channels=0"),
    (["model=transformer", "model.nhead=3"], {}, (), AppConfigError, "not divisible by model.nhead=3"),
    (["model=transformer", "model.num_layers=0"], {}, (), AppConfigError, "model.num_layers=0"),
    (["model=transformer", "model.max_len=8"], {}, (), AppConfigError, "data.seq_len=15"),
    (["model=transformer", "model.vocab_size=8"], {}, (), AppConfigError, "data.vocab_size=16"),
    (["model=transformer", "data=digits"], {}, (), AppConfigError, "model=transformer reads tokens"),
    (["model=cnn", "data=digits"], {}, (), AppConfigError, "model=cnn reads digit images"),
    (["model=mlp", "data=digits_images"], {}, (), AppConfigError, "but the data gives digit images"),
    # app keys
    (["monitor=val_los"], {}, (), AppConfigError, "monitor='val_los'"),
    (["seed=-1"], {}, (), AppConfigError, "seed=-1"),
    (["seed=4294967296"], {}, (), AppConfigError, "valid seeds are 0..4294967295"),
    (["monitor_mode=banana"], {}, (), AppConfigError, "monitor_mode='banana': valid are null"),
    (["monitor=val_acc", "monitor_mode=min"], {}, (), AppConfigError, "the checkpoint kept as best would be"),
    (["monitor=train_loss", "monitor_mode=max"], {}, (), AppConfigError, "a lower train_loss is better"),
    # settings checked against each other (issue 21)
    (
        ["+trainer.devices=3", "strategy.device_ids=2"],
        {},
        (),
        ConfigValueError,
        "trainer.devices=3 contradicts strategy.device_ids=2",
    ),
    (
        ["data.val_fraction=0.0005"],
        {},
        (),
        AppConfigError,
        "data.val_fraction=0.0005 leaves 0 of the 1797 samples for validation",
    ),
    (["data.test_fraction=0.0005"], {}, (), AppConfigError, "leaves 0 of the 1797 samples for test"),
    (
        ["model=transformer", "data.num_samples=20", "data.val_fraction=0.04"],
        {},
        (),
        AppConfigError,
        "data.val_fraction=0.04 leaves 0 of the 20 samples",
    ),
    # composition (Hydra's schemas)
    (["model.lrr=0.1"], {}, (), ConfigCompositionException, "model.lrr"),
    (["trainer.max_epochs=1.5"], {}, (), ConfigCompositionException, "trainer.max_epochs"),
    (["data.batch_size=many"], {}, (), ConfigCompositionException, "data.batch_size"),
    (["strategy=nonexistent"], {}, (), ConfigCompositionException, "Could not find 'strategy/nonexistent'"),
    # launch variables
    ([*DDP], {"MASTER_PORT": "0"}, (), InstantiationException, "valid are 1..65535"),
    ([*DDP], {"WORLD_SIZE": "0"}, (), InstantiationException, "WORLD_SIZE='0'"),
    ([*DDP], {"LOCAL_RANK": "junk"}, (), InstantiationException, "LOCAL_RANK='junk'"),
    ([*DDP], {"LOCAL_RANK": "-1"}, (), InstantiationException, "LOCAL_RANK='-1'"),
    ([*DDP], {"NODE_RANK": "x"}, (), InstantiationException, "NODE_RANK='x'"),
    ([*DDP], {"RANK": "-3"}, (), InstantiationException, "unset RANK when you start the run yourself"),
    (
        ["strategy.device_ids=[0]", "trainer.accelerator=auto"],
        {"CUDA_VISIBLE_DEVICES": ""},
        (),
        DeviceSelectionError,
        "CUDA_VISIBLE_DEVICES='' is set",
    ),
    (
        ["strategy=ddp", "trainer.accelerator=auto"],
        {AUTO_IDS_ENV: "junk"},
        (40, 40),
        DeviceSelectionError,
        "is not a comma-separated list",
    ),
    (
        ["strategy=ddp", "trainer.accelerator=auto"],
        {"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1"},
        (40, 40),
        DeviceSelectionError,
        "Name the GPUs",
    ),
]


def _row_id(row: Any) -> str:
    values = row.values if hasattr(row, "values") else row
    overrides, env = values[0], values[1]
    return " ".join([*(f"{k}={v}" for k, v in env.items()), *overrides])[:80]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in LAUNCH_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.slow  # each row composes the whole app config with Hydra (about 0.2 s a row)
@pytest.mark.parametrize(
    ("overrides", "env", "gpus", "error", "phrase"), APP_ROWS, ids=list(map(_row_id, APP_ROWS))
)
def test_app_input(
    compose_app: Callable[..., DictConfig],
    fake_gpus: Callable[..., list[GPUInfo]],
    clean_env: pytest.MonkeyPatch,
    overrides: list[str],
    env: dict[str, str],
    gpus: tuple[float, ...],
    error: type[Exception],
    phrase: str,
) -> None:
    fake_gpus(*gpus)  # none unless the row asks: the same answer on every machine
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(error) as info:
        cfg = compose_app("trainer.accelerator=cpu", *overrides)  # a row may choose another accelerator
        validate_app_config(cfg)
        build_trainer(cfg, logger=False, enable_progress_bar=False)  # what the app does before fit
    message = str(info.value)
    assert phrase in message, message


# -- Python API: (id, call, environment, exception type, phrase) ----------------------------------------

DP, DDPS, SPLIT, DDPSplit = DataParallelStrategy, DDPStrategy, ModelSplitStrategy, DDPSplitStrategy


def _wrong(value: object) -> Any:
    """A value of the wrong type, passed on purpose."""
    return value


CPU = torch.device("cpu")


def _fit_on(devices: int | list[int], strategy: pl.strategies.Strategy, accelerator: str = "cpu") -> None:
    """Fit a tiny model: a refusal must come before the first step."""
    from tests.helpers.equivalence import TinyNet, make_data

    trainer = pl.Trainer(
        accelerator=accelerator,
        devices=devices,
        strategy=strategy,
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyNet(), DataLoader(make_data(), batch_size=8))
    raise AssertionError(f"trained {trainer.global_step} step(s) on {trainer.strategy.root_device}")


#: A strategy given parallel_devices and a Trainer(devices=...) that asks for others (1 on the CPU is
#: what devices="auto" means there, so it cannot be told from the default and is accepted: see
#: tests/devices/test_devices_agree.py).
DEVICES_DISAGREE = "the strategy's list would win without a word"

API_ROWS: list[Any] = [
    (
        "dp parallel_devices=[cpu]*3 devices=2",
        lambda: _fit_on(2, DP(parallel_devices=[CPU] * 3)),
        {},
        DeviceSelectionError,
        "Trainer(devices=2) asks for 2 device(s) (cpu, cpu), but DataParallelStrategy(parallel_devices=...)",
    ),
    (
        "model_split parallel_devices=[cpu]*2 devices=3",
        lambda: _fit_on(3, SPLIT(parallel_devices=[CPU] * 2)),
        {},
        DeviceSelectionError,
        DEVICES_DISAGREE,
    ),
    (
        "ddp parallel_devices=[cpu]*2 devices=3",
        lambda: _fit_on(3, DDPS(parallel_devices=[CPU] * 2)),
        {},
        DeviceSelectionError,
        "DDPStrategy(parallel_devices=...) was given 2 (cpu, cpu)",
    ),
    (
        "ddp_split parallel_devices=[cpu]*4 devices=2",
        lambda: _fit_on(2, DDPSplit(parallel_devices=[CPU] * 4)),
        {},
        DeviceSelectionError,
        "DDPSplitStrategy(parallel_devices=...) was given 4",
    ),
    ("dp output_device=banana", lambda: DP(output_device="banana"), {}, ValueError, "output_device='banana'"),
    # max_memory is checked when the strategy is built (its range once the devices are known)
    ("split max_memory -5", lambda: SPLIT(max_memory={0: -5}), {}, PlacementError, "not a positive size"),
    ("split max_memory lots", lambda: SPLIT(max_memory={0: "lots"}), {}, PlacementError, "'512MiB'"),
    ("split max_memory True", lambda: SPLIT(max_memory={0: True}), {}, PlacementError, "not a positive size"),
    (
        "split max_memory key x",
        lambda: SPLIT(max_memory={"x": "1GiB"}),
        {},
        PlacementError,
        "device positions",
    ),
    (
        "split max_memory key -1",
        lambda: SPLIT(max_memory={-1: "1GiB"}),
        {},
        PlacementError,
        "device positions",
    ),
    ("dp output_device=-1", lambda: DP(output_device=-1), {}, ValueError, "a CUDA index >= 0"),
    ("dp output_device=True", lambda: DP(output_device=True), {}, ValueError, "output_device=True"),
    ("ddp timeout=-1", lambda: DDPS(timeout=-1), {}, DDPConfigError, "timeout=-1"),
    ("ddp timeout=0s", lambda: DDPS(timeout=timedelta(0)), {}, DDPConfigError, "from 1 to 86400"),
    (
        "ddp timeout=0.001",
        lambda: DDPS(timeout=0.001),
        {},
        DDPConfigError,
        "timeout=0.001 (strategy.timeout)",
    ),
    ("ddp timeout=inf", lambda: DDPS(timeout=float("inf")), {}, DDPConfigError, "timeout=inf (strategy"),
    ("ddp timeout=nan", lambda: DDPS(timeout=float("nan")), {}, DDPConfigError, "timeout=nan (strategy"),
    ("ddp timeout=2 days", lambda: DDPS(timeout=timedelta(days=2)), {}, DDPConfigError, "(a day)"),
    ("ddp_split timeout=inf", lambda: DDPSplit(timeout=float("inf")), {}, DDPConfigError, "timeout=inf"),
    ("ddp timeout=soon", lambda: DDPS(timeout=_wrong("soon")), {}, DDPConfigError, "timeout='soon'"),
    (
        "ddp backend=banana",
        lambda: DDPS(process_group_backend="banana"),
        {},
        DDPConfigError,
        "Valid: gloo, nccl",
    ),
    (
        "ddp backend=map",
        lambda: DDPS(process_group_backend="cpu:gloo,cuda:bogus"),
        {},
        DDPConfigError,
        "'bogus'",
    ),
    ("ddp MASTER_PORT=99999", DDPS, {"MASTER_PORT": "99999"}, DDPConfigError, "MASTER_PORT='99999'"),
    ("ddp WORLD_SIZE=two", DDPS, {"WORLD_SIZE": "two"}, DDPConfigError, "WORLD_SIZE='two'"),
    (
        "ddp_split devices_per_process=0",
        lambda: DDPSplitStrategy(devices_per_process=0),
        {},
        DDPLaunchError,
        ">= 2",
    ),
    (
        "ddp chunks=4",
        lambda: DDPS(chunks=4),
        {},
        DDPLaunchError,
        "Use DDPSplitStrategy(devices_per_process=k",
    ),
    ("split chunks=0", lambda: SPLIT(chunks=0), {}, PlacementError, "chunks=0"),
    ("split placement=42", lambda: SPLIT(placement=_wrong(42)), {}, PlacementError, "placement=42"),
    (
        "resolve banana",
        lambda: resolve_devices("banana"),
        {},
        DeviceSelectionError,
        "is not a device request",
    ),
    ("resolve tpu", lambda: resolve_devices(2, "tpu"), {}, DeviceSelectionError, "Unknown accelerator 'tpu'"),
    (
        "resolve default_cpu_count=0",
        lambda: resolve_devices("auto", "cpu", default_cpu_count=0),
        {},
        DeviceSelectionError,
        "cpu_fallback=0",
    ),
    (
        "resolve min_free_memory=10XB on cpu",
        lambda: resolve_devices("cpu", "cpu", min_free_memory="10XB"),
        {},
        DeviceSelectionError,
        "'10XB'",
    ),
    (
        "resolve min_free_memory=-5",
        lambda: resolve_devices(1, "cpu", min_free_memory=-5),
        {},
        DeviceSelectionError,
        "min_free_memory=-5",
    ),
    ("resolve True", lambda: resolve_devices(True), {}, DeviceSelectionError, "device_ids=True"),
    (
        "resolve [0,a]",
        lambda: resolve_devices(_wrong([0, "a"]), "gpu"),
        {},
        DeviceSelectionError,
        "must be an int",
    ),
    (
        "resolve cpu on gpu",
        lambda: resolve_devices("cpu", "gpu"),
        {},
        DeviceSelectionError,
        "the two disagree",
    ),
    ("resolve -3 on cpu", lambda: resolve_devices(-3, "cpu"), {}, DeviceSelectionError, "must be >= 1"),
]


@pytest.mark.parametrize(
    ("call", "env", "error", "phrase"), [r[1:] for r in API_ROWS], ids=[r[0] for r in API_ROWS]
)
def test_python_api_input(
    fake_gpus: Callable[..., list[GPUInfo]],
    clean_env: pytest.MonkeyPatch,
    call: Callable[[], Any],
    env: dict[str, str],
    error: type[Exception],
    phrase: str,
) -> None:
    fake_gpus()
    for name, value in env.items():
        clean_env.setenv(name, value)
    with pytest.raises(error) as info:
        call()
    assert phrase in str(info.value), str(info.value)


# -- CLIs: (main, argv with {placeholders}, exit status, phrase on stderr) --------------------------------

CLI_ROWS: list[Any] = [
    (ckpt.main, ["export", "{ckpt}", "{file}/net.pt"], 1, "is a file, not a folder"),
    (
        ckpt.main,
        ["export", "{ckpt}", "{file}/sub/net.safetensors"],
        1,
        "is a file, not a folder",
    ),
    (ckpt.main, ["inspect", "{dir}/missing.ckpt"], 1, "does not exist"),
    (ckpt.main, ["inspect", "{dir}"], 1, "is a directory"),
    (ckpt.main, ["inspect", "{pickle}"], 1, "in neither of torch.save's formats"),
    (ckpt.main, ["export", "{pickle}", "{dir}/out.pt"], 1, "in neither of torch.save's formats"),
    (ckpt.main, ["inspect", "{random}"], 1, "not a readable PyTorch checkpoint"),
    (ckpt.main, ["inspect", "{truncated}"], 1, "is truncated: it starts as a checkpoint in torch.save's zip"),
    (ckpt.main, ["export", "{truncated}", "{dir}/out.pt"], 1, "is truncated"),
    (ckpt.main, ["inspect", "{empty}"], 1, "is empty (0 bytes)"),
    (ckpt.main, ["inspect", "/dev/null"], 1, "is a character device (a terminal, /dev/null...)"),
    (
        ckpt.main,
        ["export", "{ckpt}", "{dir}/net.safetensors", "--format", "pt"],
        2,
        "--format pt contradicts OUT 'net.safetensors'",
    ),
    (ckpt.main, ["export", "{ckpt}", "{dir}/net.pt", "--format", "safetensors"], 2, "names pt"),
    (ckpt.main, ["inspect", "{file}"], 1, "not a readable PyTorch checkpoint"),
    (ckpt.main, ["inspect", "{custom}"], 1, "--unsafe-unpickle"),  # a torch file that needs it: offered
    (ckpt.main, ["export", "{ckpt}", "{ckpt}", "--force"], 1, "is the input checkpoint"),
    (ckpt.main, ["export", "{ckpt}", "{file}"], 1, "pass --force to replace it"),
    (ckpt.main, ["export", "{ckpt}", "{dir}/out.pt", "--submodule", "nope"], 1, "No submodule 'nope'"),
    (ckpt.main, ["export", "{ckpt}", "{dir}/out.onnx", "--format", "onnx"], 2, "invalid choice: 'onnx'"),
    (ckpt.main, ["export", "{ckpt}"], 2, "the following arguments are required: out"),
    (ckpt.main, [], 2, "the following arguments are required: COMMAND"),
    (ckpt.main, ["convert", "{ckpt}"], 2, "invalid choice: 'convert'"),
    (devices.main, ["--min-free-memory", "10XB"], 2, "Cannot read '10XB' as a size"),
    (devices.main, ["--min-free-memory=-5GiB"], 2, "Cannot read '-5GiB' as a size"),
    (devices.main, ["--bogus"], 2, "unrecognized arguments: --bogus"),
]


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    """A checkpoint, a plain pickle, random bytes, a regular file, a folder, one needing unpickling, a
    checkpoint cut short, an empty file."""
    torch.save({"state_dict": {"model.w": torch.ones(2)}, "epoch": 0}, tmp_path / "run.ckpt")
    with (tmp_path / "plain.pkl").open("wb") as f:  # protocol 2, as old tools write: globals up front
        pickle.dump(argparse.Namespace(state_dict={"w": [1.0]}), f, protocol=2)
    (tmp_path / "random.bin").write_bytes(random.Random(0).randbytes(4096))
    (tmp_path / "notes.txt").write_text("not a folder\n")
    torch.save({"state_dict": {}, "args": argparse.Namespace(lr=1)}, tmp_path / "custom.ckpt")
    (tmp_path / "cut.ckpt").write_bytes((tmp_path / "run.ckpt").read_bytes()[:600])  # a copy cut short
    (tmp_path / "empty.ckpt").write_bytes(b"")
    names = {"ckpt": "run.ckpt", "pickle": "plain.pkl", "random": "random.bin", "file": "notes.txt"}
    names |= {"truncated": "cut.ckpt", "empty": "empty.ckpt"}
    return {
        **{key: str(tmp_path / name) for key, name in names.items()},
        "dir": str(tmp_path),
        "custom": str(tmp_path / "custom.ckpt"),
    }


@pytest.mark.parametrize(
    ("main", "argv", "status", "phrase"), CLI_ROWS, ids=[" ".join(r[1]) for r in CLI_ROWS]
)
def test_cli_input(
    capsys: pytest.CaptureFixture[str],
    files: dict[str, str],
    main: Callable[[list[str]], int],
    argv: list[str],
    status: int,
    phrase: str,
) -> None:
    try:
        code = main([arg.format(**files) for arg in argv])
    except SystemExit as exit_:  # argparse's usage errors
        code = int(exit_.code or 0)
    err = capsys.readouterr().err
    assert code == status, err
    assert phrase in err, err
    if "{pickle}" in argv:
        assert "unsafe" not in err.lower() and "weights_only" not in err  # never offered for a foreign file


def test_the_table_covers_about_a_hundred_inputs() -> None:
    assert len(APP_ROWS) + len(API_ROWS) + len(CLI_ROWS) + len(SUBPROCESS_ROWS) >= 100


# -- the real app, as a user runs it ---------------------------------------------------------------------

SUBPROCESS_ROWS: list[Any] = [
    (
        ["strategy.min_free_memory=10XB"],
        {},
        "min_free_memory='10XB' (strategy.min_free_memory) is not a size",
    ),
    (["data.val_fraction=1.5"], {}, "data.val_fraction=1.5"),
    (["model=mlp", "data=tokens"], {}, "model=mlp reads flat 64-feature digits"),
    ([*DDP], {"MASTER_PORT": "99999"}, "MASTER_PORT='99999' is not a TCP port"),
    (["hydra.run.dir={file}/run"], {}, "is a file, not a folder"),
    # launch variables that made ddp wait strategy.timeout (30 minutes) at the rendezvous
    ([*DDP], {"NODE_RANK": "1"}, "NODE_RANK=1 (LightningEnvironment), but trainer.num_nodes=1"),
    (
        [*DDP, "trainer.num_nodes=2"],
        {"NODE_RANK": "1", "MASTER_ADDR": "node-0.gpupar.invalid"},
        "MASTER_ADDR='node-0.gpupar.invalid' does not resolve to an address",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "env", "phrase"), SUBPROCESS_ROWS, ids=list(map(_row_id, SUBPROCESS_ROWS))
)
def test_the_app_exits_1_with_the_message_before_training(
    tmp_path: Path, overrides: list[str], env: dict[str, str], phrase: str
) -> None:
    (tmp_path / "notes.txt").write_text("not a folder\n")
    run_dir = tmp_path / "run"
    args = [o.format(file=tmp_path / "notes.txt") for o in overrides]
    command = [sys.executable, str(ROOT / "examples" / "train.py"), f"hydra.run.dir={run_dir}", *args]
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    done = subprocess.run(
        [*command, "trainer.accelerator=cpu"],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert phrase in done.stderr, done.stderr[-3000:]
    assert not (run_dir / "checkpoints").exists() and "Epoch 0" not in done.stdout + done.stderr


# -- Placement inputs only the model can decide: refused in setup, before the first training step ----------


@pytest.mark.parametrize(
    ("options", "phrase"),
    [
        ({"max_memory": {0: "1KiB", 1: "1KiB"}}, "max_memory"),  # a cap the plan cannot meet
        ({"no_split": ["NotAClass"]}, "NotAClass"),  # a class the model does not have
        ({"placement": {"model.0": 0, "model.9": 1}}, "model.9"),  # a submodule the model does not have
    ],
    ids=["caps-too-small", "no_split-unknown-class", "placement-unknown-submodule"],
)
def test_placement_the_model_cannot_take_fails_before_the_first_step(
    tmp_path: Path, options: dict[str, Any], phrase: str
) -> None:
    from tests.helpers.equivalence import TinyNet, make_data

    module = TinyNet()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelSplitStrategy(**options),
        max_steps=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        default_root_dir=tmp_path,
    )
    with pytest.raises(PlacementError) as info:
        trainer.fit(module, DataLoader(make_data(), batch_size=8))
    assert phrase in str(info.value), str(info.value)
    assert trainer.global_step == 0
