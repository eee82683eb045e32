"""Shared pieces of the benchmark scripts: step timing inside Lightning, and the machine's description.

Each script measures its variants side by side in one run, interleaved (A, B, A, B, ...), and reports the
median step time of each and their ratios, so a busy machine slows every variant alike.
"""

from __future__ import annotations

import csv
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
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


def report(
    title: str, medians: dict[str, float], ratios: dict[str, tuple[str, str]], name: str | None = None
) -> None:
    """Print the medians and the requested ratios (``name: (numerator, denominator)``); with ``name``,
    also write ``results/NAME.csv`` and its chart (:func:`save_results`)."""
    print(f"\n## {title}\nmachine: {machine()}")
    for variant, seconds in medians.items():
        print(f"  {variant:<40} {seconds * 1e3:9.2f} ms/step")
    values = {ratio: medians[num] / medians[den] for ratio, (num, den) in ratios.items()}
    for ratio, value in values.items():
        print(f"  ratio {ratio:<34} {value:9.3f}")
    if name is not None:
        rows = [("ms/step", variant, round(seconds * 1e3, 3)) for variant, seconds in medians.items()]
        for path in save_results(name, title, rows, values):
            if path is not None:
                print(f"  written: {path}")


RESULTS = Path(__file__).resolve().parent / "results"


def target_of(name: str) -> tuple[str, float] | None:
    """The target a ratio's name states, e.g. ``"split/unsplit (target <= 1.03)"`` -> ``("<=", 1.03)``."""
    found = re.search(r"target\s*(<=|>=)\s*([0-9.]+)", name)
    return (found.group(1), float(found.group(2))) if found else None


def save_results(
    name: str, title: str, rows: list[tuple[str, str, float]], ratios: dict[str, float], chart: bool = True
) -> tuple[Path, Path | None]:
    """Write ``results/NAME.csv`` (machine line first, then ``kind,name,value`` rows) and a PNG chart of
    the ratios with their targets drawn; returns both paths (``None`` for the chart without matplotlib)."""
    RESULTS.mkdir(exist_ok=True)
    csv_path = RESULTS / f"{name}.csv"
    with csv_path.open("w", newline="") as handle:
        handle.write(f"# {title}\n# machine: {machine()}\n")
        writer = csv.writer(handle)
        writer.writerow(["kind", "name", "value"])
        writer.writerows(rows)
        writer.writerows(("ratio", ratio, f"{value:.4f}") for ratio, value in ratios.items())
    return csv_path, _chart(RESULTS / f"{name}.png", title, ratios) if chart else None


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend, or ``None`` (with a message) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no chart: matplotlib is missing (pip install 'lightning-gpupar[plot]')")
        return None
    return plt


def _chart(path: Path, title: str, ratios: dict[str, float]) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(7, 0.5 * len(names) + 1.5), dpi=80)
    rows = range(len(names))
    ax.barh(rows, [ratios[n] for n in names], color="#4c72b0")
    for row, ratio_name in zip(rows, names, strict=True):
        ax.text(ratios[ratio_name], row, f" {ratios[ratio_name]:.3f}", va="center", fontsize=8)
        target = target_of(ratio_name)
        if target is not None:
            ax.plot([target[1]] * 2, [row - 0.45, row + 0.45], color="red", linewidth=2)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yticks(list(rows))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ratio against its baseline (red: the target)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
