"""A model for the app whose rank 1 alone hears SIGTERM, late in a step, after rank 0 has moved on.

``model._target_=tests.helpers.late_sigterm.MLPSigtermOnRank1`` with ``GPUPAR_TEST_SIGTERM_AT_STEP=N``: at the
end of step N, rank 1 waits (rank 0 finishes the step and waits for rank 1 in the next one), then sends
SIGTERM to itself, as a scheduler signalling one process of a job would. Rank 0 hears it only when rank 1's
handler forwards it, while blocked in a collective of the next step: the order that made a run crash in a
collective (``Connection closed by peer``) instead of stopping.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from examples.models import MLPClassifier

SIGTERM_AT_STEP_ENV = "GPUPAR_TEST_SIGTERM_AT_STEP"
#: Long enough for rank 0 to finish the step and block in the next one's first collective.
RANK1_DELAY_S = 2.0


class MLPSigtermOnRank1(MLPClassifier):
    """The app's MLP; rank 1 sends itself SIGTERM at step ``$GPUPAR_TEST_SIGTERM_AT_STEP``."""

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = os.environ.get(SIGTERM_AT_STEP_ENV)
        if step is not None and self.global_rank == 1 and self.trainer.global_step == int(step):
            time.sleep(RANK1_DELAY_S)
            os.kill(os.getpid(), signal.SIGTERM)
