"""`examples/train.py` end to end, as a user runs it, and the examples' own error messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from examples.data import DigitsDataModule

ROOT = Path(__file__).resolve().parents[2]


def run_app(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess[str]:
    """Run the app with its output under tmp_path; fail the test with the app's stderr if it fails."""
    cmd = [sys.executable, str(ROOT / "examples" / "train.py"), f"hydra.run.dir={tmp_path}", *overrides]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result


@pytest.mark.slow
def test_app_trains_tests_and_reports_the_checkpoint(tmp_path: Path) -> None:
    result = run_app(
        tmp_path, "trainer.max_epochs=2", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"
    )
    assert "test_acc:" in result.stdout
    ckpt_line = next(line for line in result.stdout.splitlines() if line.startswith("best checkpoint: "))
    ckpt = Path(ckpt_line.removeprefix("best checkpoint: "))
    assert ckpt.is_file() and ckpt.is_relative_to(tmp_path)
    assert (tmp_path / ".hydra" / "config.yaml").is_file()
    assert list((tmp_path / "logs").rglob("metrics.csv"))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert any(key.startswith("model.") for key in state["state_dict"])


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the default run picks GPUs where there are any")
def test_the_default_demo_run_reaches_95_percent_with_two_cpu_replicas(tmp_path: Path) -> None:
    """`make demo`: the default config, nothing overridden but where the output goes."""
    result = run_app(tmp_path)
    assert "strategy: DataParallelStrategy on cpu, cpu" in result.stdout.splitlines()
    accuracy = next(line for line in result.stdout.splitlines() if line.startswith("test_acc: "))
    assert float(accuracy.removeprefix("test_acc: ")) >= 0.95, result.stdout


#: The example transformer, small enough for a test run: 2 layers, 256 samples, one epoch.
TINY_TRANSFORMER = ("model=transformer", "model.num_layers=2", "data.num_samples=256", "trainer.max_epochs=1")


@pytest.mark.slow
def test_app_trains_the_transformer(tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        *TINY_TRANSFORMER,
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
    )
    assert "test_acc:" in result.stdout


@pytest.mark.slow
def test_app_rejects_an_unknown_strategy_with_the_options(tmp_path: Path) -> None:
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "train.py"),
        f"hydra.run.dir={tmp_path}",
        "strategy=nonexistent",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Could not find 'strategy/nonexistent'" in result.stderr
    assert "Available options in 'strategy'" in result.stderr


def test_missing_scikit_learn_names_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError) as err:
        DigitsDataModule().setup("fit")
    assert "pip install scikit-learn" in str(err.value)
    assert "pip install -c constraints.txt -e '.[examples]'" in str(err.value)
    assert "lightning-gpupar[" not in str(err.value)  # not on PyPI


def test_digits_splits_are_seeded() -> None:
    first, second, other = DigitsDataModule(seed=1), DigitsDataModule(seed=1), DigitsDataModule(seed=2)
    for dm in (first, second, other):
        dm.setup("fit")
    assert first.test_set.indices == second.test_set.indices  # type: ignore[union-attr]
    assert first.test_set.indices != other.test_set.indices  # type: ignore[union-attr]


@pytest.mark.slow
def test_app_pipelines_the_transformer_traced(tmp_path: Path) -> None:
    result = run_app(
        tmp_path,
        *TINY_TRANSFORMER,
        "trainer.limit_train_batches=5",
        "trainer.accelerator=cpu",
        "trainer.enable_progress_bar=false",
        "test=false",
        "strategy=model_split",
        "strategy.chunks=2",
        f"strategy.trace={tmp_path / 'schedule'}",
    )
    output = result.stdout + result.stderr
    assert "measured bubble fraction" in output and "partition 1" in output
    assert (tmp_path / "schedule.json").is_file()
