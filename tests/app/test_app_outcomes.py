"""What the app reports is what it did (issue 21): the best checkpoint follows the metric, runs without a
best checkpoint test the current weights and say so, a moved run directory keeps its ``last.ckpt``, a
resume with other settings is refused or reported, and a non-finite loss stops the run.

Most runs call the app's ``train`` in this process (a few seconds each, no interpreter start); the
non-finite loss runs are real processes, to see the exit status a user sees.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Callable
from pathlib import Path
from unittest.mock import MagicMock

import pytest
import torch
from omegaconf import DictConfig

from examples.checks import validate_app_config
from examples.run_facts import CHECKPOINT_KEY, ResumeMismatchError, RunFacts
from examples.train import train
from tests.helpers.app_runs import STRATEGIES, TINY, finish, output, progress, start

RUN_BOUND_S = 300.0


@pytest.fixture
def run_app(
    compose_app: Callable[..., DictConfig], capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[dict[str, float], str]]:
    """Run the app's ``train`` on a tiny CPU config; its metrics and what it printed."""

    def run(output_dir: Path, *overrides: str) -> tuple[dict[str, float], str]:
        cfg = compose_app(*TINY, "strategy=single", *overrides)
        validate_app_config(cfg)
        capsys.readouterr()
        metrics = train(cfg, output_dir)
        return metrics, capsys.readouterr().out

    return run


def _logged(run_dir: Path, metric: str) -> dict[int, float]:
    """``metric`` per epoch, from every CSV log of the run directory."""
    values: dict[int, float] = {}
    for path in sorted((run_dir / "logs").rglob("metrics.csv")):
        with path.open() as f:
            for row in csv.DictReader(f):
                if row.get(metric):
                    values[int(row["epoch"])] = float(row[metric])
    return values


def _best_line(printed: str) -> str:
    return next(line for line in printed.splitlines() if line.startswith("best checkpoint: "))


@pytest.mark.slow
def test_monitor_val_acc_keeps_the_most_accurate_checkpoint_and_tests_it(
    tmp_path: Path, run_app: Callable[..., tuple[dict[str, float], str]]
) -> None:
    metrics, printed = run_app(tmp_path, "monitor=val_acc", "trainer.max_epochs=4", "test=true")
    accuracy = _logged(tmp_path, "val_acc")
    assert len(accuracy) == 4 and max(accuracy.values()) > min(accuracy.values()), accuracy
    best_epoch = max(accuracy, key=lambda e: (accuracy[e], -e))  # the first epoch with the highest value
    best = Path(_best_line(printed).removeprefix("best checkpoint: "))
    assert best.name.startswith(f"epoch={best_epoch}-"), (best.name, accuracy)
    assert "checkpoint selection: the best is the one with the highest val_acc" in printed
    assert "test_acc" in metrics


@pytest.mark.slow
@pytest.mark.parametrize(
    ("overrides", "why"),
    [
        (("trainer.max_epochs=0",), "training ran no step"),
        (("trainer.max_steps=1",), "training ended before the first validation"),
        (("+trainer.fast_dev_run=true",), "fast_dev_run saves no checkpoints"),
        (("trainer.limit_val_batches=0",), "training ended before the first validation"),
    ],
    ids=["max_epochs=0", "max_steps=1", "fast_dev_run", "limit_val_batches=0"],
)
def test_a_run_without_a_best_checkpoint_tests_the_current_weights_and_says_so(
    tmp_path: Path,
    run_app: Callable[..., tuple[dict[str, float], str]],
    overrides: tuple[str, ...],
    why: str,
) -> None:
    metrics, printed = run_app(tmp_path, *overrides, "test=true")
    assert 0 <= metrics["test_acc"] <= 1, metrics
    assert f"no best checkpoint (no val_loss was logged: {why}" in printed, printed
    assert "testing the weights at the end of training" in printed
    assert "best checkpoint: none" in printed


@pytest.mark.slow
def test_a_copied_run_directory_resumes_writing_its_own_last_ckpt_and_keeps_the_best(
    tmp_path: Path, run_app: Callable[..., tuple[dict[str, float], str]]
) -> None:
    first, copy = tmp_path / "first", tmp_path / "copy"
    every_3 = "checkpoint_every_n_steps=3"
    run_app(first, "trainer.max_epochs=2", every_3)
    shutil.copytree(first, copy)
    _, printed = run_app(copy, "trainer.max_epochs=3", every_3, "ckpt_path=last")

    names = sorted(p.name for p in (copy / "checkpoints").iterdir())
    assert not [n for n in names if "-v1" in n], names
    assert progress(copy / "checkpoints" / "last.ckpt") == (2, 15)
    assert progress(copy / "checkpoints" / "last-step.ckpt") == (2, 15)
    assert "the run directory moved" in printed, printed
    loss = _logged(copy, "val_loss")
    assert sorted(loss) == [0, 1, 2]
    best_epoch = min(loss, key=lambda e: (loss[e], e))  # over the whole run, not just the resumed part
    best = Path(_best_line(printed).removeprefix("best checkpoint: "))
    assert best.parent == copy / "checkpoints" and best.name.startswith(f"epoch={best_epoch}-"), (best, loss)


@pytest.fixture
def finished_run(tmp_path: Path, run_app: Callable[..., tuple[dict[str, float], str]]) -> Path:
    """Two 5-batch epochs, batches of 16, lr 0.003; last-step.ckpt at step 9 (mid-epoch), last.ckpt at 10."""
    run = tmp_path / "run"
    run_app(run, "trainer.max_epochs=2", "checkpoint_every_n_steps=3", "model.lr=0.003")
    assert progress(run / "checkpoints" / "last-step.ckpt") == (1, 9)
    return run / "checkpoints"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("checkpoint", "overrides", "phrase"),
    [
        ("last-step.ckpt", ("data.batch_size=8",), "with data.batch_size=16; this run has data.batch_size=8"),
        ("last.ckpt", ("seed=1",), "other data: data.seed 0 -> 1"),
        ("last.ckpt", ("data.val_fraction=0.2",), "data.val_fraction 0.15 -> 0.2"),
    ],
    ids=["mid_epoch-batch_size", "seed", "val_fraction"],
)
def test_a_resume_that_would_train_on_other_samples_is_refused_before_training(
    tmp_path: Path,
    finished_run: Path,
    run_app: Callable[..., tuple[dict[str, float], str]],
    checkpoint: str,
    overrides: tuple[str, ...],
    phrase: str,
) -> None:
    with pytest.raises(ResumeMismatchError) as info:
        run_app(
            tmp_path / "resumed", "trainer.max_epochs=3", f"ckpt_path={finished_run / checkpoint}", *overrides
        )
    assert phrase in str(info.value), str(info.value)
    assert not (tmp_path / "resumed" / "checkpoints").exists()  # nothing trained, nothing saved


@pytest.mark.slow
def test_a_resume_with_another_lr_batch_size_and_device_count_says_so_and_uses_the_new_lr(
    tmp_path: Path, finished_run: Path, run_app: Callable[..., tuple[dict[str, float], str]]
) -> None:
    resumed = tmp_path / "resumed"
    _, printed = run_app(
        resumed,
        "trainer.max_epochs=3",
        f"ckpt_path={finished_run / 'last.ckpt'}",
        "model.lr=0.001",
        "data.batch_size=8",
        *STRATEGIES["dp"],
    )
    assert "resume: settings changed since the checkpoint (checkpoint -> now):" in printed, printed
    assert "model.lr: 0.003 -> 0.001 (the resumed optimizer uses 0.001)" in printed
    assert "data.batch_size: 16 -> 8" in printed and "devices: 1 -> 2" in printed
    saved = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert [g["lr"] for g in saved["optimizer_states"][0]["param_groups"]] == [0.001]
    assert saved["global_step"] == 10 + 5  # five batches of 8 in the third epoch


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["dp", "model_split"])
def test_a_nan_loss_stops_the_run_at_its_first_step_with_status_1(tmp_path: Path, strategy: str) -> None:
    run = tmp_path / "run"
    proc = start(run, *STRATEGIES[strategy], "model._target_=tests.helpers.nan_loss.MLPWithNaNLoss")
    code, _ = finish(proc, RUN_BOUND_S, run)
    said = output(run)
    assert code == 1, said[-3000:]
    assert "The training loss is nan at step 0 (epoch 0, batch 0)" in said, said[-3000:]
    assert "stop_on_nonfinite_loss=false" in said
    assert not list((run / "checkpoints").glob("*.ckpt")) if (run / "checkpoints").exists() else True


def test_a_new_lr_is_refused_when_the_model_has_schedulers(compose_app: Callable[..., DictConfig]) -> None:
    """A scheduler's state in the checkpoint is built on the old rate: setting a new one would mix them."""
    facts = RunFacts(compose_app("model.lr=0.001"))
    trainer = MagicMock(lr_scheduler_configs=[MagicMock()])
    facts.on_load_checkpoint(trainer, MagicMock(), {CHECKPOINT_KEY: {**facts.facts, "model.lr": 0.003}})
    with pytest.raises(ResumeMismatchError, match=r"model.lr changed from 0.003 to 0.001, but the model has"):
        facts.on_train_start(trainer, MagicMock())
