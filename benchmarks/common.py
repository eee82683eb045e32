"""Shared pieces of the benchmark scripts: step timing inside Lightning, and the machine's description.

Each script measures its variants side by side in one run, interleaved (A, B, B, A, ...), and reports the
median step time of each and their ratios, each ratio the median of the ratios within one round, so a busy
machine slows every variant alike.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from lightning_gpupar.model_split.balance.by_time import measure_stage_times


class StepTimer(pl.Callback):
    """Time of each training step (batch start to batch end), after ``warmup`` steps: wall time, or with
    ``clock=time.process_time`` this process's CPU time (on a shared CPU machine the time other tenants
    hold the cores then stays out of the step times)."""

    def __init__(self, warmup: int = 3, clock: Callable[[], float] = time.perf_counter) -> None:
        self.warmup = warmup
        self.clock = clock
        self.times: list[float] = []
        self._start = 0.0
        self._seen = 0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        synchronize(trainer.strategy)
        self._start = self.clock()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        synchronize(trainer.strategy)
        self._seen += 1
        if self._seen > self.warmup:
            self.times.append(self.clock() - self._start)


def add_token_model_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The options of the pipeline benchmarks' TransformerNet runs (bench_pipeline, bench_schedules)."""
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: no OpenMP contention)")


def token_batch(size: int, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline benchmarks' fixed batch: random tokens of a 16-word vocabulary, two classes."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 16, (size, seq), generator=g), torch.randint(0, 2, (size,), generator=g)


def synchronize(strategy: Any) -> None:
    """Wait for every GPU ``strategy`` computes on in this process (``torch.cuda.synchronize()`` alone
    waits for the current device only: a second GPU's queued work would count in the next step)."""
    if torch.cuda.is_available():
        for device in used_cuda_devices(strategy):
            torch.cuda.synchronize(device)


def used_cuda_devices(strategy: Any) -> list[torch.device]:
    """The CUDA devices this process computes on: a DDP rank's own (never another rank's: that would make
    a CUDA context there), all of a single-process strategy's (dp, model_split)."""
    devices = getattr(strategy, "process_devices", None)
    if devices is None:
        parallel = getattr(strategy, "parallel_devices", None)
        one_process = getattr(strategy, "world_size", 1) == 1
        devices = parallel if parallel and one_process else [strategy.root_device]
    return [d for d in dict.fromkeys(devices) if d.type == "cuda"]


def fit_step_times(
    module: pl.LightningModule,
    loader: Any,
    steps: int,
    clock: Callable[[], float] = time.perf_counter,
    **trainer_kwargs: Any,
) -> list[float]:
    """Fit ``steps`` steps and return the timed step durations (seconds, by ``clock``: see StepTimer)."""
    timer = StepTimer(clock=clock)
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


#: The median step seconds of each variant in each round: ``{variant: [round 1, round 2, ...]}``.
Rounds = dict[str, list[float]]


def interleaved(variants: dict[str, Callable[[], list[float]]], rounds: int) -> Rounds:
    """Run every variant once per round, alternating the order (A B C, C B A, ...); keep each run's median.

    Ratios are then taken within a round (:func:`paired_ratio`), so the machine's speed drifting between
    rounds (other tenants, frequency) cancels instead of landing on whichever variant ran then.
    """
    per_round: Rounds = {name: [] for name in variants}
    names = list(variants)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            per_round[name].append(statistics.median(variants[name]()))
    return per_round


def paired_ratio(per_round: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> list[float]:
    """``numerator / denominator`` in each round, sorted."""
    pairs = zip(per_round[numerator], per_round[denominator], strict=True)
    return sorted(num / den for num, den in pairs)


def stage_group_times(
    net: nn.Module, groups: Sequence[Sequence[str]], sample: Any, device: torch.device, repeats: int = 3
) -> list[float]:
    """Forward + backward seconds of each group of submodules (paths of ``net``) on the input each gets
    when ``net`` runs ``sample``: the sum of its submodules' medians, as ``balance="time"`` measures them."""
    paths = [path for group in groups for path in group]
    seconds = dict(zip(paths, measure_stage_times(net, paths, sample, device, repeats=repeats), strict=True))
    return [sum(seconds[path] for path in group) for group in groups]


def machine() -> str:
    """One line naming the machine the numbers came from."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores "
        f"({torch.get_num_threads()} torch threads), {gpu}, "
        f"torch {torch.__version__}, lightning {pl.__version__}, Python {platform.python_version()}"
    )


def report(
    title: str,
    per_round: Mapping[str, float | Sequence[float]],
    ratios: dict[str, tuple[str, str]],
    name: str | None = None,
) -> None:
    """Print each variant's median step time and the requested ratios (``name: (numerator, denominator)``),
    each the median of its per-round ratios with their range; with ``name``, also write
    ``results/NAME.csv`` and its chart (:func:`save_results`). A plain float is a variant's one round."""
    rounds = {v: [t] if isinstance(t, float | int) else list(t) for v, t in per_round.items()}
    print(f"\n## {title}\nmachine: {machine()}")
    for variant, times in rounds.items():
        print(f"  {variant:<40} {statistics.median(times) * 1e3:9.2f} ms/step")
    spreads = {ratio: paired_ratio(rounds, num, den) for ratio, (num, den) in ratios.items()}
    values = {ratio: statistics.median(spread) for ratio, spread in spreads.items()}
    for ratio, value in values.items():
        low, high = spreads[ratio][0], spreads[ratio][-1]
        rounds_text = f"  ({len(spreads[ratio])} rounds: {low:.3f} .. {high:.3f})" if high > low else ""
        print(f"  ratio {ratio:<34} {value:9.3f}{rounds_text}")
    if name is not None:
        rows = [("ms/step", v, round(statistics.median(t) * 1e3, 3)) for v, t in rounds.items()]
        rows += [("ratio lowest round", r, round(spread[0], 4)) for r, spread in spreads.items()]
        rows += [("ratio highest round", r, round(spread[-1], 4)) for r, spread in spreads.items()]
        ranges = {r: (spread[0], spread[-1]) for r, spread in spreads.items()}
        for path in save_results(name, title, rows, values, ranges=ranges):
            if path is not None:
                print(f"  written: {path}")


RESULTS = Path(__file__).resolve().parent / "results"


def target_of(name: str) -> tuple[str, float] | None:
    """The target a ratio's name states, e.g. ``"split/unsplit (target <= 1.03)"`` -> ``("<=", 1.03)``."""
    found = re.search(r"target\s*(<=|>=)\s*([0-9.]+)", name)
    return (found.group(1), float(found.group(2))) if found else None


def save_results(
    name: str,
    title: str,
    rows: list[tuple[str, str, float]],
    ratios: dict[str, float],
    chart: bool = True,
    ranges: dict[str, tuple[float, float]] | None = None,
) -> tuple[Path, Path | None]:
    """Write ``results/NAME.csv`` (machine line first, then ``kind,name,value`` rows) and a PNG chart of
    the ratios with their targets drawn (and, given ``ranges``, each ratio's lowest and highest round as a
    whisker); returns both paths (``None`` for the chart without matplotlib)."""
    RESULTS.mkdir(exist_ok=True)
    csv_path = RESULTS / f"{name}.csv"
    with csv_path.open("w", newline="") as handle:
        handle.write(f"# {title}\n# machine: {machine()}\n")
        writer = csv.writer(handle)
        writer.writerow(["kind", "name", "value"])
        writer.writerows(rows)
        writer.writerows(("ratio", ratio, f"{value:.4f}") for ratio, value in ratios.items())
    return csv_path, _chart(RESULTS / f"{name}.png", title, ratios, ranges or {}) if chart else None


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


def _chart(
    path: Path, title: str, ratios: dict[str, float], ranges: dict[str, tuple[float, float]]
) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    names = list(ratios)
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(names) + 1.6), dpi=80)
    rows = range(len(names))
    ax.barh(rows, [ratios[n] for n in names], color="#4c72b0")
    for row, ratio_name in zip(rows, names, strict=True):
        if ratio_name in ranges:  # the rounds' spread: how far one round's ratio strays
            ax.plot(list(ranges[ratio_name]), [row, row], color="black", linewidth=1)
        right = max(ratios[ratio_name], ranges.get(ratio_name, (0.0, 0.0))[1])
        ax.text(right, row, f" {ratios[ratio_name]:.3f}", va="center", fontsize=8)
        target = target_of(ratio_name)
        if target is not None:
            ax.plot([target[1]] * 2, [row - 0.45, row + 0.45], color="red", linewidth=2)
    ax.axvline(1.0, color="grey", linewidth=0.8, linestyle=":")
    ax.set_yticks(list(rows))
    ax.set_yticklabels(names, fontsize=8)
    ax.invert_yaxis()
    whiskers = ", black: lowest to highest round" if ranges else ""
    ax.set_xlabel(f"ratio against its baseline (red: the target{whiskers})", fontsize=8)
    ax.set_title(textwrap.fill(title, 60), fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
