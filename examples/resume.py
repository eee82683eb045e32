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
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader, RandomSampler

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
        return {"batches_given": self._given}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state["batches_given"])


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


def resolve_ckpt_path(value: str | None, checkpoint_dir: Path) -> str | None:
    """The ``ckpt_path`` to hand ``trainer.fit``: None (fresh), ``"last"`` or an existing file.

    ``last`` is Lightning's: the newest ``last*.ckpt`` of ``checkpoint_dir`` (interrupted ones included);
    when there is none yet the run starts fresh and says so. A path that is not a file is an error.
    """
    if value is None:
        return None
    if value == LAST:
        if not any(checkpoint_dir.glob("last*.ckpt")):
            log.info("ckpt_path=last: no checkpoint in %s yet, so training starts fresh.", checkpoint_dir)
            return None
        return LAST
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
