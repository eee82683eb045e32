"""Shared pieces of the benchmark scripts: step timing inside Lightning, and the machine's description.

Each script measures its variants side by side in one run, interleaved (A, B, A, B, ...), and reports the
median step time of each and their ratios, so a busy machine slows every variant alike.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch


class StepTimer(pl.Callback):
    """Wall time of each training step (batch start to batch end), after ``warmup`` steps."""

    def __init__(self, warmup: int = 3) -> None:
        self.warmup = warmup
        self.times: list[float] = []
        self._start = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._seen += 1
        if self._seen > self.warmup:
            self.times.append(time.perf_counter() - self._start)


def fit_step_times(module: pl.LightningModule, loader: Any, steps: int, **trainer_kwargs: Any) -> list[float]:
    """Fit ``steps`` steps and return the timed step durations (seconds)."""
    timer = StepTimer()
    options: dict[str, Any] = dict(
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        callbacks=[timer],
    )
    options.update(trainer_kwargs)
    pl.Trainer(**options).fit(module, loader)
    return timer.times


def interleaved(variants: dict[str, Callable[[], list[float]]], rounds: int) -> dict[str, float]:
    """Median step time of each variant over ``rounds`` interleaved runs."""
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, measure in variants.items():
            samples[name].extend(measure())
    return {name: statistics.median(times) for name, times in samples.items()}


def machine() -> str:
    """One line naming the machine the numbers came from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}, "
        f"torch {torch.__version__}, lightning {pl.__version__}, Python {platform.python_version()}"
    )


def report(title: str, medians: dict[str, float], ratios: dict[str, tuple[str, str]]) -> None:
    """Print the medians and the requested ratios (``name: (numerator, denominator)``)."""
    print(f"\n## {title}\nmachine: {machine()}")
    for name, seconds in medians.items():
        print(f"  {name:<40} {seconds * 1e3:9.2f} ms/step")
    for name, (num, den) in ratios.items():
        print(f"  ratio {name:<34} {medians[num] / medians[den]:9.3f}")
