"""`strategy=ddp` from Hydra: the options reach DDP, devices come from strategy.device_ids."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from datetime import timedelta

import pytest
import torch
from hydra.errors import ConfigCompositionException
from omegaconf import DictConfig

from lightning_gpupar import DDPStrategy
from lightning_gpupar.config import build_trainer
from lightning_gpupar.ddp.launcher import HydraAwareScriptLauncher
from lightning_gpupar.devices import LAUNCHER_PID_ENV, DeviceSelectionError, GPUInfo
from lightning_gpupar.devices import requests as devices
from tests.helpers.markers import GiB
from tests.helpers.programs import preserved_environ

Compose = Callable[..., DictConfig]


def test_ddp_options_reach_the_strategy(compose_app: Compose) -> None:
    cfg = compose_app(
        "strategy=ddp",
        "trainer.accelerator=cpu",
        "strategy.device_ids=3",
        "strategy.find_unused_parameters=true",
        "strategy.static_graph=true",
        "strategy.gradient_as_bucket_view=true",
        "strategy.process_group_backend=gloo",
        "strategy.timeout=90",
    )
    strategy = build_trainer(cfg, logger=False).strategy
    assert isinstance(strategy, DDPStrategy)
    assert strategy.parallel_devices == [torch.device("cpu")] * 3
    assert strategy._ddp_kwargs == {
        "find_unused_parameters": True,
        "static_graph": True,
        "gradient_as_bucket_view": True,
    }
    assert (strategy.process_group_backend, strategy._timeout) == ("gloo", timedelta(seconds=90))


def test_auto_on_a_machine_without_gpus_means_two_processes(compose_app: Compose) -> None:
    strategy = build_trainer(compose_app("strategy=ddp", "trainer.accelerator=cpu"), logger=False).strategy
    assert isinstance(strategy, DDPStrategy) and strategy.num_processes == 2


def test_a_gpu_id_this_node_lacks_fails_before_any_trainer(
    compose_app: Compose, fake_gpus: Callable[..., object]
) -> None:
    fake_gpus(40, 40)
    with pytest.raises(DeviceSelectionError, match="no GPU with id 3"):
        build_trainer(compose_app("strategy=ddp", "trainer.accelerator=gpu", "strategy.device_ids=[0,3]"))


def test_a_misspelt_ddp_option_fails_at_composition(compose_app: Compose) -> None:
    with pytest.raises(
        ConfigCompositionException, match=r"Could not override 'strategy\.static_grpah'"
    ) as info:
        compose_app("strategy=ddp", "strategy.static_grpah=true")
    assert "Key 'static_grpah' not in 'DDPStrategyConfig'" in str(info.value.__cause__)


# -- strategy.device_ids=auto on GPUs: chosen once, by the launching rank ----------------------------------


def gpus_whose_free_memory_changes(monkeypatch: pytest.MonkeyPatch, *calls: tuple[float, ...]) -> None:
    """Fake GPUs whose free memory (GiB) is ``calls[0]`` at the first query, ``calls[1]`` at the next..."""
    answers = [[GPUInfo(i, "Fake", 80 * GiB, int(free * GiB)) for i, free in enumerate(c)] for c in calls]
    monkeypatch.setattr(devices, "query_gpus", lambda: answers.pop(0) if len(answers) > 1 else answers[0])


def test_children_train_on_the_gpus_the_launching_rank_chose(
    compose_app: Compose, fake_gpus: Callable[..., object], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_gpus(0, 0, 0, 0)
    # When rank 0 chooses, GPU 1 has the most free memory; once rank 0 holds it, GPU 3 has.
    gpus_whose_free_memory_changes(monkeypatch, (30, 40, 10, 35), (30, 8, 10, 35))
    cfg = compose_app("strategy=ddp", "trainer.accelerator=gpu")  # device_ids: auto
    started: list[dict[str, str]] = []
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, env, cwd: started.append(env))
    with preserved_environ():
        rank0 = build_trainer(cfg, logger=False)
        chosen = [torch.device("cuda", i) for i in (1, 3, 0, 2)]
        assert rank0.strategy.parallel_devices == chosen
        launcher = rank0.strategy.launcher
        assert isinstance(launcher, HydraAwareScriptLauncher)
        launcher._call_children_scripts()
    assert [env["LOCAL_RANK"] for env in started] == ["1", "2", "3"]
    for local_rank, env in enumerate(started, start=1):
        with preserved_environ():
            os.environ.clear()
            os.environ.update(env)
            child = build_trainer(cfg, logger=False)
            assert child.strategy.parallel_devices == chosen
            assert (child.local_rank, child.strategy.root_device) == (local_rank, chosen[local_rank])


TORCHRUN_RANK_1 = {"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1"}
SLURM_TASK_1 = {
    **{"SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "2", "SLURM_NNODES": "1", "SLURM_NODEID": "0"},
    **{"SLURM_PROCID": "1", "SLURM_LOCALID": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "7"},
    "SLURM_NODELIST": "127.0.0.1",
}


@pytest.mark.parametrize(
    ("env", "launcher"),
    [(TORCHRUN_RANK_1, r"torchrun \(WORLD_SIZE=2\)"), (SLURM_TASK_1, r"SLURM \(SLURM_NTASKS=2\)")],
)
def test_auto_gpus_are_refused_in_ranks_another_launcher_started(
    compose_app: Compose, fake_gpus: Callable[..., object], env: dict[str, str], launcher: str
) -> None:
    fake_gpus(40, 40)
    with preserved_environ():
        os.environ.update(env)
        with pytest.raises(
            DeviceSelectionError,
            match=rf"device_ids='auto' in a process started by {launcher}.*two ranks could share a GPU.*"
            r"strategy\.device_ids=\[0,1,2,3\].*strategy\.device_ids=4",
        ):
            build_trainer(compose_app("strategy=ddp", "trainer.accelerator=gpu"), logger=False)
        explicit = build_trainer(
            compose_app("strategy=ddp", "trainer.accelerator=gpu", "strategy.device_ids=2"), logger=False
        )
        assert explicit.strategy.parallel_devices == [torch.device("cuda", 0), torch.device("cuda", 1)]
        cpu = build_trainer(compose_app("strategy=ddp", "trainer.accelerator=cpu"), logger=False)
        assert cpu.strategy.num_processes == 2  # auto on the CPU is the same count in every rank


def test_the_launching_rank_of_a_sweep_still_chooses_by_free_memory(
    compose_app: Compose, fake_gpus: Callable[..., object]
) -> None:
    """The second job of a sweep starts while the first job's DDP variables are still set in rank 0."""
    fake_gpus(10, 40)
    with preserved_environ():
        os.environ.update({"WORLD_SIZE": "2", "LOCAL_RANK": "0", LAUNCHER_PID_ENV: str(os.getpid())})
        trainer = build_trainer(compose_app("strategy=ddp", "trainer.accelerator=gpu"), logger=False)
    assert trainer.strategy.parallel_devices == [torch.device("cuda", 1), torch.device("cuda", 0)]
