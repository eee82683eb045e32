"""What the app needs to continue a run exactly: a shuffle that depends on the epoch, a DataLoader that
remembers its place in the epoch, and the ``ckpt_path`` setting.

Lightning restores the step, epoch, optimizer and loop state from a checkpoint, and a DataLoader's own
state only when the DataLoader has ``state_dict`` / ``load_state_dict``. A plain ``DataLoader`` with
``shuffle=True`` draws each epoch's order from one generator, so a resumed run would see the first
epoch's order again, and after a mid-epoch checkpoint it would start the epoch over. Here each epoch's
order is a function of ``(seed, epoch)`` (Lightning calls ``set_epoch``; under DDP Lightning's
``DistributedSampler`` does the same), and the loader skips the batches the checkpoint had consumed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, RandomSampler

from examples.run_facts import ResumeMismatchError
from lightning_gpupar.checkpoint.io import CheckpointError, load_checkpoint_file

log = logging.getLogger(__name__)

#: The ``ckpt_path`` value that means "the newest checkpoint of this run directory", as in Lightning.
LAST = "last"


class EpochShuffleSampler(RandomSampler):
    """A ``RandomSampler`` whose order in epoch ``e`` is ``randperm`` seeded with ``seed + e``.

    Being a ``RandomSampler``, it is replaced by Lightning's ``DistributedSampler(shuffle=True)`` under DDP.
    """

    def __init__(self, data_source: Any, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by Lightning at the start of every epoch."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose state is the number of batches it gave in the current epoch.

    Lightning saves it in every checkpoint and loads it on resume; the next epoch's iterator then skips
    that many batches, after Lightning has set the epoch, so the resumed epoch sees the batches the
    interrupted one had not reached, in the same order.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._given = 0
        self._skip = 0

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        skip, self._skip = self._skip, 0
        self._given = skip
        return self._batches(super().__iter__(), skip)

    def _batches(self, batches: Iterator[Any], skip: int) -> Iterator[Any]:
        for _ in range(skip):  # runs at the first batch, once the sampler knows its epoch
            next(batches, None)
        for batch in batches:
            self._given += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"batches_given": self._given, "batch_size": self.batch_size or 0, "shards": self._shards()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Called by Lightning on a resume in the middle of an epoch only."""
        given = int(state["batches_given"])
        old_size, old_shards = state.get("batch_size", self.batch_size), state.get("shards", self._shards())
        if given and (old_size, old_shards) != (self.batch_size, self._shards()):
            size = old_size != self.batch_size
            changed = f"data.batch_size={old_size}" if size else f"{old_shards} processes"
            now = f"data.batch_size={self.batch_size}" if size else f"{self._shards()} processes"
            raise ResumeMismatchError(
                f"The checkpoint was saved {given} batches into an epoch of a run with {changed}; this run "
                f"has {now}. The resumed epoch would skip {given} batches of the new kind, training some "
                "samples twice and others never. Resume with the checkpoint's value, or from an epoch-end "
                "checkpoint (checkpoints/last.ckpt when checkpoint_every_n_steps wrote last-step.ckpt)."
            )
        self._skip = given

    def _shards(self) -> int:
        """Into how many parts the sampler splits the data (DDP's processes; 1 otherwise)."""
        return int(getattr(self.sampler, "num_replicas", 1))


class InterruptCheckpoint(Callback):
    """Save ``last-interrupted.ckpt`` when SIGTERM or Ctrl-C stops training; ``ckpt_path=last`` finds it.

    Lightning raises its SIGTERM exception at a batch boundary; Ctrl-C lands anywhere, and the step it
    interrupted is done again on resume. Other errors save nothing: their state may be broken.
    (Lightning's ``OnExceptionCheckpoint`` would also turn ``fit(ckpt_path=None)`` into a resume.)
    """

    FILENAME = "last-interrupted.ckpt"

    def __init__(self, dirpath: Path) -> None:
        self.path = Path(dirpath) / self.FILENAME

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        fitting = trainer.state.fn == TrainerFn.FITTING  # validation during fit too (a signal lands there)
        if isinstance(exception, (KeyboardInterrupt, SIGTERMException)) and fitting:
            trainer.save_checkpoint(self.path)
            if trainer.is_global_zero:
                print(f"interrupted: checkpoint saved to {self.path}", flush=True)


class RunDirCheckpoint(ModelCheckpoint):
    """A ``ModelCheckpoint`` that follows its run directory when the directory is moved or copied.

    Lightning keeps the directory's absolute path in its state; resumed from another place, it forgets
    which files are the last and the best ones, so it writes ``last-v1.ckpt`` beside the old
    ``last.ckpt`` and ranks the best checkpoint among the new epochs only. Here the saved paths that lie
    in the old directory are read as the same files in the new one (where they exist), so ``last.ckpt``
    stays the newest and the best checkpoint is chosen over the whole run.
    """

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        old = state_dict.get("dirpath")
        if old is None or self.dirpath is None or old == self.dirpath:
            super().load_state_dict(state_dict)
            return
        moved = _moved_state(state_dict, Path(old), Path(self.dirpath))
        super().load_state_dict(moved)
        if self.best_k_models:
            worst, best = (max, min) if self.mode == "min" else (min, max)
            self.kth_best_model_path = worst(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
            self.kth_value = self.best_k_models[self.kth_best_model_path]
            self.best_model_path = best(self.best_k_models, key=self.best_k_models.get)  # type: ignore[arg-type]
            self.best_model_score = self.best_k_models[self.best_model_path]
        _say(
            f"the run directory moved: the checkpoint's {old} is now {self.dirpath}; "
            "its files there continue."
        )


def _moved_state(state: dict[str, Any], old: Path, new: Path) -> dict[str, Any]:
    """``state`` with paths under ``old`` read under ``new``; paths found in neither place dropped."""

    def where(path: str) -> str:
        if not path:
            return path
        file = Path(path)
        if file.is_relative_to(old) and (new / file.relative_to(old)).exists():
            return str(new / file.relative_to(old))
        return path if file.exists() else ""

    moved = dict(state, dirpath=str(new))
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in moved:
            moved[key] = where(moved[key])
    best_k = {where(path): score for path, score in state.get("best_k_models", {}).items()}
    moved["best_k_models"] = {path: score for path, score in best_k.items() if path}
    return moved


@rank_zero_only
def _say(message: str) -> None:
    print(message, flush=True)


def resolve_ckpt_path(value: str | None, checkpoint_dir: Path) -> str | None:
    """The ``ckpt_path`` to hand ``trainer.fit``: None (fresh) or an existing file.

    ``last`` is the newest ``last*.ckpt`` of ``checkpoint_dir`` (interrupted ones included) that loads:
    a newer one that does not (cut short by a full disk, damaged) is passed over, and the run says so;
    when none loads, the error names each. When there is none yet the run starts fresh and says so.
    A path that is not a file is an error.
    """
    if value is None:
        return None
    if value == LAST:
        candidates = sorted(checkpoint_dir.glob("last*.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
        if not candidates:
            log.info("ckpt_path=last: no checkpoint in %s yet, so training starts fresh.", checkpoint_dir)
            return None
        return str(_newest_that_loads(candidates, checkpoint_dir).resolve())
    path = Path(value).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"ckpt_path={value!r} {what} (resolved: {path.resolve()}). Give the path of a checkpoint file "
            f"(e.g. {checkpoint_dir / 'last.ckpt'}), or ckpt_path=last to continue from this run "
            "directory's newest checkpoint (set hydra.run.dir to the interrupted run's directory), or "
            "ckpt_path=null to start fresh."
        )
    return str(path.resolve())


class NoLoadableCheckpointError(CheckpointError, ValueError):
    """``ckpt_path=last``, but none of the run directory's ``last*.ckpt`` loads."""


def _newest_that_loads(candidates: list[Path], checkpoint_dir: Path) -> Path:
    unreadable: list[str] = []
    for path in candidates:
        try:
            load_checkpoint_file(path)
        except CheckpointError as err:
            unreadable.append(f"{path.name}: {err}")
            continue
        if unreadable:
            log.warning(
                "ckpt_path=last: the newest checkpoint does not load, so the run continues from %s, the "
                "newest one that does. Passed over:\n  %s",
                path,
                "\n  ".join(unreadable),
            )
        return path
    raise NoLoadableCheckpointError(
        f"ckpt_path=last: none of the checkpoints in {checkpoint_dir} loads:\n  "
        + "\n  ".join(unreadable)
        + "\nName a checkpoint file that loads (ckpt_path=PATH), or start fresh (ckpt_path=null)."
    )
