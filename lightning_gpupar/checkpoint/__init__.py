"""Portable checkpoints: canonical keys, tolerant loading, atomic files, Lightning integration."""

from lightning_gpupar.checkpoint.io import (
    AtomicCheckpointIO,
    CheckpointFileError,
    UnsafeCheckpointError,
    atomic_torch_save,
    load_checkpoint_file,
)
from lightning_gpupar.checkpoint.keys import (
    WRAPPER_SEGMENTS,
    CheckpointError,
    KeyCollisionError,
    canonical_names,
    normalize_state_dict,
    submodule_candidates,
    submodule_state_dict,
)
from lightning_gpupar.checkpoint.lightning import CanonicalCheckpointMixin, NormalizeCheckpointKeys
from lightning_gpupar.checkpoint.matching import (
    LoadReport,
    StateDictMismatchError,
    load_state_dict_flexible,
    remap_state_dict,
)
from lightning_gpupar.checkpoint.write_errors import CheckpointSaveError

__all__ = [
    "WRAPPER_SEGMENTS",
    "AtomicCheckpointIO",
    "CanonicalCheckpointMixin",
    "CheckpointError",
    "CheckpointFileError",
    "CheckpointSaveError",
    "KeyCollisionError",
    "LoadReport",
    "NormalizeCheckpointKeys",
    "StateDictMismatchError",
    "UnsafeCheckpointError",
    "atomic_torch_save",
    "canonical_names",
    "load_checkpoint_file",
    "load_state_dict_flexible",
    "normalize_state_dict",
    "remap_state_dict",
    "submodule_candidates",
    "submodule_state_dict",
]
