"""``ckpt_path=last`` after ``kill -9``: the resumed run ends with the weights of a run never interrupted.

The killed run dies in the middle of an epoch (step 7 of 5-batch epochs). With
``checkpoint_every_n_steps=3`` its newest checkpoint is mid-epoch (step 6), without it the end of epoch 0
(step 5): the resumed run must see the batches the killed one had not reached, in the same order.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from unittest.mock import MagicMock, call

import pytest
import torch
from hydra.errors import ConfigCompositionException
from lightning.pytorch.trainer.states import RunningStage, TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig

from examples.resume import (
    EpochShuffleSampler,
    InterruptCheckpoint,
    NoLoadableCheckpointError,
    ResumableDataLoader,
    resolve_ckpt_path,
)
from examples.run_facts import ResumeMismatchError
from tests.helpers.app_runs import STRATEGIES, finish, output, progress, start, weights
from tests.helpers.self_kill import KILL_AT_STEP_ENV

RUN_BOUND_S = 300.0
KILLED_RUN = ("model._target_=tests.helpers.self_kill.MLPKilledAtStep", "trainer.max_epochs=3")
MID_EPOCH = ("checkpoint_every_n_steps=3",)


def _run(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> int:
    proc = start(run_dir, *KILLED_RUN, *overrides, env=env)
    return finish(proc, RUN_BOUND_S, run_dir)[0]


def _reference_and_killed_run(reference: Path, run: Path, *overrides: str) -> None:
    """The uninterrupted run and the run killed at step 7, side by side (two runs of one machine, as users
    start them; each is a process of its own, so the results cannot mix)."""
    uninterrupted = start(reference, *KILLED_RUN, *overrides)
    killed = start(run, *KILLED_RUN, *overrides, env={KILL_AT_STEP_ENV: "7"})
    assert finish(killed, RUN_BOUND_S, run)[0] == -9, output(run)[-3000:]
    assert finish(uninterrupted, RUN_BOUND_S, reference)[0] == 0, output(reference)[-3000:]


def _assert_same_weights(got: Path, expected: Path) -> None:
    assert progress(got) == progress(expected)
    got_weights, expected_weights = weights(got), weights(expected)
    assert got_weights.keys() == expected_weights.keys()
    for key, value in expected_weights.items():
        assert torch.equal(got_weights[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize(
    ("strategy", "checkpoints"),
    [
        ("single", MID_EPOCH),
        ("single", ()),
        ("dp", MID_EPOCH),
        ("model_split", MID_EPOCH),
        ("ddp", MID_EPOCH),
    ],
    ids=["single-mid_epoch", "single-epoch_end", "dp-mid_epoch", "model_split-mid_epoch", "ddp-mid_epoch"],
)
def test_run_killed_mid_epoch_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path: Path, strategy: str, checkpoints: tuple[str, ...]
) -> None:
    overrides = (*STRATEGIES[strategy], *checkpoints)
    reference, run = tmp_path / "reference", tmp_path / "run"
    _reference_and_killed_run(reference, run, *overrides)
    newest = run / "checkpoints" / ("last-step.ckpt" if checkpoints else "last.ckpt")
    assert progress(newest) == ((1, 6) if checkpoints else (0, 5))  # epoch 1 is unfinished

    assert _run(run, *overrides, "ckpt_path=last") == 0, output(run)[-3000:]
    assert "resuming from: last" in output(run)
    _assert_same_weights(run / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_dp_run_resumes_under_single(tmp_path: Path) -> None:
    """Same data order (both one process), so the result is the dp run's within float tolerance."""
    reference, run = tmp_path / "reference", tmp_path / "run"
    _reference_and_killed_run(reference, run, *STRATEGIES["dp"], *MID_EPOCH)
    assert _run(run, *STRATEGIES["single"], *MID_EPOCH, "ckpt_path=last") == 0, output(run)[-3000:]
    got, expected = run / "checkpoints" / "last.ckpt", reference / "checkpoints" / "last.ckpt"
    assert progress(got) == progress(expected)
    for key, value in weights(expected).items():
        torch.testing.assert_close(weights(got)[key], value, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_last_without_a_checkpoint_starts_fresh_and_says_so(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code = _run(run, *STRATEGIES["single"], "trainer.max_epochs=1", "ckpt_path=last")
    assert code == 0, output(run)[-3000:]
    assert "no checkpoint in" in output(run) and "training starts fresh" in output(run)
    assert progress(run / "checkpoints" / "last.ckpt") == (0, 5)


@pytest.mark.slow
def test_a_missing_checkpoint_path_fails_before_training(tmp_path: Path) -> None:
    run, missing = tmp_path / "run", tmp_path / "nowhere" / "x.ckpt"
    assert _run(run, *STRATEGIES["single"], f"ckpt_path={missing}") != 0
    assert f"ckpt_path='{missing}' does not exist" in output(run)
    assert "strategy:" not in output(run)  # nothing was built
    assert not (run / "checkpoints").exists()


def test_resolve_ckpt_path(tmp_path: Path) -> None:
    checkpoints = tmp_path / "checkpoints"
    assert resolve_ckpt_path(None, checkpoints) is None
    assert resolve_ckpt_path("last", checkpoints) is None  # nothing saved yet: fresh
    checkpoints.mkdir()
    interrupted = checkpoints / "last-interrupted.ckpt"
    torch.save({"state_dict": {}, "global_step": 3}, interrupted)
    assert resolve_ckpt_path("last", checkpoints) == str(interrupted.resolve())
    assert resolve_ckpt_path(str(interrupted), checkpoints) == str(interrupted.resolve())
    with pytest.raises(FileNotFoundError, match="is a directory"):
        resolve_ckpt_path(str(checkpoints), checkpoints)
    with pytest.raises(FileNotFoundError, match=r"does not exist.*ckpt_path=last"):
        resolve_ckpt_path(str(tmp_path / "x.ckpt"), checkpoints)


def _write_at(path: Path, content: bytes | None, mtime: float) -> None:
    if content is None:
        torch.save({"state_dict": {"w": torch.ones(2)}, "global_step": int(mtime)}, path)
    else:
        path.write_bytes(content)
    os.utime(path, (mtime, mtime))


def test_last_passes_over_a_newest_checkpoint_that_does_not_load_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk or a damaged file: ``last-step.ckpt`` is newest but cut short; ``last.ckpt`` is whole."""
    _write_at(tmp_path / "last.ckpt", None, 1000)
    whole = (tmp_path / "last.ckpt").read_bytes()
    _write_at(tmp_path / "last-step.ckpt", whole[: len(whole) // 2], 2000)
    with caplog.at_level(logging.WARNING):
        assert resolve_ckpt_path("last", tmp_path) == str((tmp_path / "last.ckpt").resolve())
    said = caplog.text
    assert "the newest checkpoint does not load" in said and "last-step.ckpt" in said, said
    assert str(tmp_path / "last.ckpt") in said, said


def test_last_refuses_naming_every_file_when_none_loads(tmp_path: Path) -> None:
    _write_at(tmp_path / "last.ckpt", b"\x00" * 64, 1000)
    _write_at(tmp_path / "last-step.ckpt", b"garbage", 2000)
    with pytest.raises(NoLoadableCheckpointError) as info:
        resolve_ckpt_path("last", tmp_path)
    assert "last.ckpt" in str(info.value) and "last-step.ckpt" in str(info.value)
    assert "ckpt_path=null" in str(info.value)


def test_the_loader_resumes_where_its_state_says_in_the_same_order() -> None:
    data = torch.arange(20)

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(data, seed=1))

    first = loader()
    first.sampler.set_epoch(2)  # type: ignore[attr-defined]
    batches = iter(first)
    seen = [next(batches), next(batches)]
    state = first.state_dict()
    rest = list(batches)
    assert state == {"batches_given": 2, "batch_size": 3, "shards": 1}

    second = loader()
    second.load_state_dict(state)
    iterator = iter(second)
    second.sampler.set_epoch(2)  # type: ignore[attr-defined]  (Lightning sets it after iter())
    resumed = list(iterator)
    assert [b.tolist() for b in resumed] == [b.tolist() for b in rest]
    assert sorted(torch.cat(seen + resumed).tolist()) == list(range(20))
    assert [b.tolist() for b in second] == [b.tolist() for b in seen + rest]  # next epoch: whole again


@pytest.mark.parametrize(
    ("saved", "phrase"),
    [
        (
            {"batches_given": 2, "batch_size": 4, "shards": 1},
            "data.batch_size=4; this run has data.batch_size=3",
        ),
        ({"batches_given": 2, "batch_size": 3, "shards": 2}, "2 processes; this run has 1 processes"),
    ],
    ids=["batch_size", "processes"],
)
def test_a_mid_epoch_state_of_another_batch_size_or_process_count_is_refused(
    saved: dict[str, int], phrase: str
) -> None:
    """Skipping 2 batches of another size (or of another shard) would train samples twice, skip others."""
    data = torch.arange(20)
    loader = ResumableDataLoader(data, batch_size=3, sampler=EpochShuffleSampler(data, seed=1))
    with pytest.raises(ResumeMismatchError, match="The resumed epoch would skip 2 batches") as info:
        loader.load_state_dict(saved)
    assert phrase in str(info.value)
    loader.load_state_dict({**saved, "batches_given": 0})  # the start of an epoch: nothing skipped, fine


def test_each_epoch_has_its_own_order_whatever_came_before() -> None:
    data = list(range(50))
    sampler = EpochShuffleSampler(data, seed=3)
    orders = []
    for epoch in (0, 1, 1):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert orders[1] == orders[2] != orders[0]
    assert sorted(orders[0]) == data


def test_the_config_takes_ckpt_path_and_checkpoint_every_n_steps(
    compose_app: Callable[..., DictConfig],
) -> None:
    defaults = compose_app()
    assert defaults.ckpt_path is None and defaults.checkpoint_every_n_steps is None
    cfg = compose_app("ckpt_path=last", "checkpoint_every_n_steps=50")
    assert cfg.ckpt_path == "last" and cfg.checkpoint_every_n_steps == 50
    with pytest.raises(ConfigCompositionException, match="checkpoint_every_n_steps"):
        compose_app("checkpoint_every_n_steps=often")


@pytest.mark.parametrize(
    ("fn", "stage", "exception", "saved"),
    [
        (TrainerFn.FITTING, RunningStage.TRAINING, SIGTERMException(), True),
        (TrainerFn.FITTING, RunningStage.VALIDATING, SIGTERMException(), True),  # a signal during validation
        (TrainerFn.FITTING, RunningStage.TRAINING, KeyboardInterrupt(), True),
        (TrainerFn.FITTING, RunningStage.TRAINING, ValueError("a bug"), False),  # its state may be broken
        (TrainerFn.TESTING, RunningStage.TESTING, SIGTERMException(), False),  # nothing to resume
    ],
)
def test_interrupt_checkpoint_saves_when_a_signal_stops_fit(
    tmp_path: Path, fn: TrainerFn, stage: RunningStage, exception: BaseException, saved: bool
) -> None:
    trainer = MagicMock()
    trainer.state.fn, trainer.state.stage = fn, stage
    trainer.training = stage == RunningStage.TRAINING
    InterruptCheckpoint(tmp_path).on_exception(trainer, MagicMock(), exception)
    expected = [call(tmp_path / "last-interrupted.ckpt")] if saved else []
    assert trainer.save_checkpoint.call_args_list == expected
