"""A model for the app whose training loss is NaN from the first step.

``model._target_=tests.helpers.nan_loss.MLPWithNaNLoss``
"""

from __future__ import annotations

from typing import Any

import torch

from examples.models import MLPClassifier


class MLPWithNaNLoss(MLPClassifier):
    """The app's MLP with a training loss that is NaN at every step (its gradients would be NaN too)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * float("nan")
