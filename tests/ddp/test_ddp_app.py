"""`examples/train.py strategy=ddp|ddp_split` as users start it: a Hydra run, a sweep, two torchrun "nodes".

Every test runs for both layouts: ddp (one CPU device per process) and ddp_split (two CPU devices per
process, each holding half of the model).
"""

from __future__ import annotations

import re
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from tests.helpers.programs import ROOT, Finished, run_bounded

APP = str(ROOT / "examples" / "train.py")
CPU_DDP = (
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.num_sanity_val_steps=0",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
)


#: strategy overrides for 2 processes on one node, and for 1 process per node.
LAYOUTS = {
    "ddp": (("strategy=ddp", "strategy.device_ids=2"), ("strategy=ddp", "strategy.device_ids=1")),
    "ddp_split": (
        ("strategy=ddp_split", "strategy.device_ids=4", "strategy.devices_per_process=2"),
        ("strategy=ddp_split", "strategy.device_ids=2", "strategy.devices_per_process=2"),
    ),
}
layouts = pytest.mark.parametrize("layout", list(LAYOUTS))
#: issue 7's command line as written (test runs add only the trainer limits of CPU_DDP after it).
ISSUE_7 = (
    "strategy=ddp_split",
    "trainer.accelerator=cpu",
    "strategy.device_ids=4",
    "strategy.devices_per_process=2",
    "model=transformer",
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def checkpoints(root: Path) -> list[Path]:
    return sorted(root.rglob("*.ckpt"))


def assert_one_ddp_job(job_dir: Path, world_size: int = 2) -> None:
    """One .hydra/, a log per rank naming its rank, checkpoints only from rank 0 in the job's dir."""
    assert sorted(p.relative_to(job_dir) for p in job_dir.rglob(".hydra")) == [Path(".hydra")]
    for rank in range(world_size):
        log = job_dir / ("train.log" if rank == 0 else f"train_rank{rank}.log")
        assert f"DDP rank {rank} of {world_size} on cpu" in log.read_text()
    ckpts = checkpoints(job_dir)
    assert {p.parent for p in ckpts} == {job_dir / "checkpoints"}
    (best,) = [p for p in ckpts if p.name != "last.ckpt"]
    keys = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert keys and all(k.startswith("model.") and ".module." not in k for k in keys)


@pytest.mark.slow
@layouts
def test_hydra_run_shares_one_run_directory(tmp_path: Path, layout: str) -> None:
    """ddp_split runs issue 7's command as written (the transformer), ddp the MLP."""
    run_dir = tmp_path / "run"
    if layout == "ddp_split":
        limits = [o for o in CPU_DDP if o != "trainer.accelerator=cpu"]
        command = [sys.executable, APP, *ISSUE_7, *limits, f"hydra.run.dir={run_dir}"]
    else:
        command = [sys.executable, APP, *CPU_DDP, *LAYOUTS[layout][0], f"hydra.run.dir={run_dir}"]
    finished = run_bounded(command, timeout=150, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "test_acc:" in finished.stdout
    assert_one_ddp_job(run_dir)
    if layout == "ddp_split":
        assert "_target_: examples.models.TransformerClassifier" in (run_dir / "train_rank1.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # the child made no directory of its own


@pytest.mark.slow
@layouts
def test_hydra_sweep_runs_each_job_once_in_its_own_directory(tmp_path: Path, layout: str) -> None:
    sweep_dir = tmp_path / "sweep"
    finished = run_bounded(
        [
            sys.executable,
            APP,
            "-m",
            *CPU_DDP,
            *LAYOUTS[layout][0],
            "model.lr=0.1,0.01",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        timeout=240,
        cwd=tmp_path,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("Launching 2 jobs") == 1
    assert finished.stdout.count("test_acc:") == 2
    assert sorted(p.name for p in sweep_dir.iterdir()) == ["0", "1", "multirun.yaml"]
    for job, lr in (("0", "0.1"), ("1", "0.01")):
        assert_one_ddp_job(sweep_dir / job)
        for log in ("train.log", "train_rank1.log"):  # each rank trained this job's model.lr
            assert re.findall(r"^lr: (\S+)$", (sweep_dir / job / log).read_text(), re.M) == [lr], log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep"]  # no second sweep from a child


def torchrun_node(node_rank: int, port: int, *overrides: str) -> list[str]:
    """The app as one of two torchrun "nodes" on this machine, one process each."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        f"--node_rank={node_rank}",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
        APP,
        *overrides,
        "trainer.num_nodes=2",
    ]


def run_together(commands: list[list[str]], timeout: float, cwd: Path) -> list[Finished]:
    with ThreadPoolExecutor(len(commands)) as pool:
        return list(pool.map(lambda cmd: run_bounded(cmd, timeout=timeout, cwd=cwd), commands))


@pytest.mark.slow
@layouts
def test_two_torchrun_nodes_train_together_and_save_one_checkpoint(tmp_path: Path, layout: str) -> None:
    port = free_port()
    node_dirs = [tmp_path / f"node{n}" for n in (0, 1)]
    procs = [
        torchrun_node(n, port, *CPU_DDP, *LAYOUTS[layout][1], f"hydra.run.dir={node_dirs[n]}") for n in (0, 1)
    ]
    results = run_together(procs, timeout=180, cwd=tmp_path)
    for result in results:
        assert result.returncode == 0, result.stderr[-3000:]
    assert "DDP rank 0 of 2 on cpu (node 0" in (node_dirs[0] / "train.log").read_text()
    assert "DDP rank 1 of 2 on cpu (node 1" in (node_dirs[1] / "train.log").read_text()
    assert len([p for p in checkpoints(node_dirs[0]) if p.name != "last.ckpt"]) == 1
    assert checkpoints(node_dirs[1]) == []


@pytest.mark.slow
def test_a_device_request_one_node_cannot_meet_fails_both_nodes_within_the_timeout(tmp_path: Path) -> None:
    """Node 1 asks for a GPU it lacks and fails before the rendezvous; node 0 waits strategy.timeout."""
    timeout_s, margin_s = 20, 60  # the margin covers torchrun's and the app's start on a busy machine
    port = free_port()
    common = [o for o in CPU_DDP if not o.startswith("trainer.accelerator=")]
    common += ["strategy=ddp", f"strategy.timeout={timeout_s}"]
    node0 = torchrun_node(0, port, *common, "trainer.accelerator=cpu", "strategy.device_ids=1")
    node1 = torchrun_node(1, port, *common, "trainer.accelerator=gpu", "strategy.device_ids=[1]")
    results = run_together(
        [[*node0, f"hydra.run.dir={tmp_path / 'node0'}"], [*node1, f"hydra.run.dir={tmp_path / 'node1'}"]],
        timeout=timeout_s + margin_s,
        cwd=tmp_path,
    )
    assert [r.returncode != 0 for r in results] == [True, True]
    assert all(r.seconds < timeout_s + margin_s for r in results)
    assert "DeviceSelectionError: device_ids=[1] asks for GPUs, but no CUDA device is visible" in (
        results[1].stderr
    )
    assert (
        f"wait timeout after {timeout_s * 1000}ms" in results[0].stderr
    )  # strategy.timeout bounded the wait
