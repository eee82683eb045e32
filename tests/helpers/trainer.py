"""The one quiet Trainer configuration the tests share: no logger, checkpoints, progress bar or summary."""

from typing import Any

QUIET: dict[str, Any] = {
    "logger": False,
    "enable_checkpointing": False,
    "enable_progress_bar": False,
    "enable_model_summary": False,
}
#: Quiet, and no validation: the equivalence harnesses compare training only.
TRAINING_ONLY: dict[str, Any] = {**QUIET, "num_sanity_val_steps": 0, "limit_val_batches": 0}
