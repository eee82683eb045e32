"""The command a DDP child runs: inside a Hydra job it is that job alone, never the sweep."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from lightning.pytorch.strategies import DDPStrategy as LightningDDPStrategy
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import open_dict

import lightning_gpupar
from examples.schema import register_app_configs
from lightning_gpupar.ddp.launcher import _quote, child_command
from tests.helpers.programs import python, run_bounded

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = str(ROOT / "examples" / "train.py")


@pytest.fixture(autouse=True)
def started_as_a_script(monkeypatch: pytest.MonkeyPatch) -> None:
    """As after `python script.py` (pytest itself runs as `python -m pytest`)."""
    monkeypatch.setattr(sys.modules["__main__"], "__spec__", None)


@pytest.fixture
def hydra_job() -> Iterator[None]:
    """Look like job #1 of `python train.py -m ... model.lr=0.1,0.01`, with an awkward output dir."""
    register_app_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "strategy=ddp",
                "model.lr=0.01",
                "hydra.mode=MULTIRUN",
                "hydra.sweep.dir=/sweeps/x",
                "hydra/launcher=basic",
                "hydra.job.chdir=true",
            ],
            return_hydra_config=True,
        )
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = "/sweeps/x/1 it's=here"
    HydraConfig.instance().set_config(cfg)
    yield
    HydraConfig.instance().cfg = None


@pytest.mark.usefixtures("hydra_job")
def test_child_runs_this_job_only_in_its_output_dir() -> None:
    argv = [
        SCRIPT,
        "-m",
        "--config-name",
        "config",
        "strategy=ddp",
        "model.lr=0.1,0.01",
        "hydra.sweep.dir=/sweeps/x",
    ]
    command, cwd = child_command(argv)
    args = command[2:]
    assert command[1] == SCRIPT and cwd == str(Path.cwd())
    assert "-m" not in args and "--multirun" not in args
    assert args[:2] == ["--config-name", "config"]
    assert "strategy=ddp" in args and "model.lr=0.01" in args  # this job's value, not the sweep's
    assert not [a for a in args if a.startswith(("hydra.sweep", "hydra/launcher", "model.lr=0.1"))]
    assert "hydra.job.chdir=true" in args  # job settings reach the child
    assert {"hydra.mode=RUN", "hydra.output_subdir=null"} <= set(args)
    run_dir = OverridesParser.create().parse_override(next(a for a in args if a.startswith("hydra.run.dir=")))
    assert run_dir.value() == "/sweeps/x/1 it's=here"


def test_without_hydra_the_child_reruns_argv() -> None:
    command, cwd = child_command([SCRIPT, "--devices", "2"])
    assert command[1:] == [SCRIPT, "--devices", "2"] and cwd is None


def test_lightnings_ddp_name_is_left_alone() -> None:
    assert lightning_gpupar.DDPStrategy is not LightningDDPStrategy
    assert StrategyRegistry["ddp"]["strategy"] is LightningDDPStrategy


@pytest.mark.slow
def test_rank_zero_outlives_the_children_it_kills(tmp_path: Path) -> None:
    finished = run_bounded(python("rank0_fails_with_a_child.py"), timeout=60, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert "caught: rank 0 failed" in finished.stdout and "survived" in finished.stdout


@pytest.mark.parametrize("directory", [r"C:\runs\one", "/a\\b", "/x/it's", "/ends/with\\", "/plain/dir"])
def test_run_directories_reach_the_child_unchanged(directory: str) -> None:
    override = OverridesParser.create().parse_override(f"hydra.run.dir={_quote(directory)}")
    assert override.value() == directory
