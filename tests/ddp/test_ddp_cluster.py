"""Processes started by SLURM: Lightning's SLURMEnvironment supplies the ranks, no real SLURM needed."""

from __future__ import annotations

import os
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins.environments import SLURMEnvironment

from lightning_gpupar import DDPStrategy
from lightning_gpupar.ddp.launcher import DDPLaunchError, HydraAwareScriptLauncher
from tests.helpers.programs import preserved_environ, python, run_bounded
from tests.helpers.programs.tiny_fit import Tiny, make_data, make_trainer


def slurm_env(procid: int, *, ntasks: int, per_node: int, port: int = 29999) -> dict[str, str]:
    """What srun sets for task ``procid`` of a job with ``ntasks`` tasks, ``per_node`` on each node."""
    return {
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NNODES": str(ntasks // per_node),
        "SLURM_JOB_NAME": "train",
        "SLURM_JOB_ID": "4242",
        "SLURM_NODELIST": "127.0.0.1",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(procid // per_node),
        "MASTER_PORT": str(port),
    }


def test_slurm_variables_give_the_ranks_and_nothing_is_spawned() -> None:
    with preserved_environ():
        os.environ.update(slurm_env(3, ntasks=4, per_node=2))
        trainer = make_trainer(devices=2, num_nodes=2)
        strategy = trainer.strategy
        assert isinstance(strategy, DDPStrategy)
        assert isinstance(strategy.cluster_environment, SLURMEnvironment)
        ranks = (trainer.global_rank, trainer.local_rank, trainer.node_rank, trainer.world_size)
        assert ranks == (3, 1, 1, 4)
        assert strategy.root_device == torch.device("cpu")
        assert isinstance(strategy.launcher, HydraAwareScriptLauncher)
        assert strategy.cluster_environment.creates_processes_externally


def test_slurm_tasks_that_do_not_match_the_devices_fail_before_the_process_group() -> None:
    with (
        preserved_environ(),
        pytest.raises(DDPLaunchError, match="SLURMEnvironment reports 4 processes in total"),
    ):
        os.environ.update(slurm_env(0, ntasks=4, per_node=2))
        make_trainer(devices=1, num_nodes=2).fit(Tiny(), make_data())
    assert not torch.distributed.is_initialized()


@pytest.mark.slow
def test_two_srun_tasks_train_together(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = python("tiny_fit.py", "--devices", "2", "--out", str(tmp_path))
    envs = [slurm_env(rank, ntasks=2, per_node=2, port=port) for rank in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda env: run_bounded(cmd, timeout=120, cwd=tmp_path, env=env), envs))
    for rank, result in enumerate(results):
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"rank {rank} of 2 finished" in result.stdout
        output = result.stdout + result.stderr
        assert f"GLOBAL_RANK: {rank}," in output and f"GLOBAL_RANK: {1 - rank}," not in output  # none spawned
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights.pt"]  # rank 0 saved
