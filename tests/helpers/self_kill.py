"""A model for the app that kills its whole run with SIGKILL at a chosen step, as ``kill -9`` would.

``model._target_=tests.helpers.self_kill.MLPKilledAtStep`` with ``GPUPAR_TEST_KILL_AT_STEP=N``: after the
N-th optimizer step (in the middle of an epoch when N is not a multiple of the epoch's length) the
process group of the run (every rank; the test starts the app in its own session) gets SIGKILL.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from examples.models import MLPClassifier

KILL_AT_STEP_ENV = "GPUPAR_TEST_KILL_AT_STEP"


class MLPKilledAtStep(MLPClassifier):
    """The app's MLP; dies with its run at step ``$GPUPAR_TEST_KILL_AT_STEP`` when that is set."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = os.environ.get(KILL_AT_STEP_ENV)
        if step is not None and self.trainer.global_step == int(step):
            os.killpg(os.getpgrp(), signal.SIGKILL)
