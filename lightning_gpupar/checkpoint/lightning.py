"""Canonical checkpoint keys inside Lightning: a mixin for our strategies, a callback for any strategy.

Where the callback hooks in: Lightning restores the model (``strategy.load_model_state_dict``)
before it calls any callback's ``on_load_checkpoint``, and skips callbacks' ``on_save_checkpoint``
for weights-only saves. The one place a callback can reach both in time is the strategy's
``checkpoint_io``: the callback wraps it in ``setup`` (which runs before the checkpoint is read), so
every file written holds canonical keys and every file read is renamed to the module's own keys
before the model loads it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import Strategy
from typing_extensions import override

from lightning_gpupar.checkpoint.adapters import adapter_record
from lightning_gpupar.checkpoint.io import AtomicCheckpointIO
from lightning_gpupar.checkpoint.keys import CheckpointError, normalize_state_dict
from lightning_gpupar.checkpoint.matching import load_state_dict_flexible, remap_state_dict

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    _Base = Strategy
else:
    _Base = object


class CanonicalCheckpointMixin(_Base):
    """Canonical keys on save, tolerant load, atomic files. Put it first among a Strategy's bases::

    class DataParallelStrategy(CanonicalCheckpointMixin, ParallelStrategy): ...
    """

    @property
    def checkpoint_io(self) -> CheckpointIO:
        """The user's ``CheckpointIO`` if one was given, else :class:`AtomicCheckpointIO`."""
        io = self._checkpoint_io
        if io is None:
            io = self._checkpoint_io = AtomicCheckpointIO()
        elif isinstance(io, _WrappingCheckpointIO) and io.checkpoint_io is None:
            io.checkpoint_io = AtomicCheckpointIO()
        return io

    @checkpoint_io.setter
    def checkpoint_io(self, io: CheckpointIO) -> None:
        self._checkpoint_io = io

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        _state_dict_of(checkpoint, checkpoint_path)  # fail here, in words, not in Lightning's migration
        return checkpoint

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None
    ) -> None:
        if "state_dict" in checkpoint and self.lightning_module is not None:
            checkpoint = {**checkpoint, **adapter_record(self.lightning_module)}
        super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        return normalize_state_dict(super().lightning_module_state_dict(), self.lightning_module)

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        assert self.lightning_module is not None
        report = load_state_dict_flexible(self.lightning_module, _state_dict_of(checkpoint), strict=strict)
        log.debug("Checkpoint loaded by canonical keys: %s", report)


class NormalizeCheckpointKeys(pl.Callback):
    """Canonical keys in every checkpoint written, any wrapped form accepted on load, for any strategy.

    Also makes Lightning's default ``TorchCheckpointIO`` atomic (:class:`AtomicCheckpointIO`).
    """

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        io = trainer.strategy.checkpoint_io
        if isinstance(io, _NormalizingCheckpointIO):
            io.module = pl_module
            return
        inner = AtomicCheckpointIO() if type(io) is TorchCheckpointIO else io
        trainer.strategy.checkpoint_io = _NormalizingCheckpointIO(inner, pl_module)


class _NormalizingCheckpointIO(CheckpointIO):
    """Delegates to ``inner``; canonical ``state_dict`` keys on save, the module's own keys on load."""

    def __init__(self, inner: CheckpointIO, module: pl.LightningModule) -> None:
        self.inner = inner
        self.module = module

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "state_dict" in checkpoint:
            state_dict = normalize_state_dict(checkpoint["state_dict"], self.module)
            checkpoint = {**checkpoint, "state_dict": state_dict, **adapter_record(self.module)}
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    @override
    def load_checkpoint(
        self, path: _PATH, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"weights_only": weights_only}
        if map_location is not None:  # else the inner IO's own default (Lightning's: the CPU)
            kwargs["map_location"] = map_location
        checkpoint = self.inner.load_checkpoint(path, **kwargs)
        state_dict = _state_dict_of(checkpoint, path)
        # Not strict here: the module's on_load_checkpoint may still migrate keys, and Lightning's own
        # load_state_dict (strict_loading) judges the result. Keys we cannot place stay as they were.
        renamed, report = remap_state_dict(self.module, state_dict, strict=False)
        for key in report.unexpected:
            renamed[key] = state_dict[key]
        checkpoint["state_dict"] = renamed
        log.debug("Checkpoint %s renamed to the module's keys: %s", path, report)
        return checkpoint

    @override
    def remove_checkpoint(self, path: _PATH) -> None:
        self.inner.remove_checkpoint(path)

    @override
    def teardown(self) -> None:
        self.inner.teardown()


def _state_dict_of(checkpoint: Mapping[str, Any], path: _PATH | None = None) -> Mapping[str, Any]:
    if "state_dict" not in checkpoint:
        where = f" {str(path)!r}" if path is not None else ""
        raise CheckpointError(
            f"Checkpoint{where} has no 'state_dict' entry (it holds: {', '.join(map(str, checkpoint))}); "
            "it is not a Lightning checkpoint. Load a plain state dict with "
            "lightning_gpupar.checkpoint.load_state_dict_flexible instead."
        )
    state_dict: Mapping[str, Any] = checkpoint["state_dict"]
    return state_dict
