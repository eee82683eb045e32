"""GPipe and 1F1B side by side: activations held per stage, and step time, as the micro-batch count M grows.

    python benchmarks/bench_schedules.py [--rounds 5] [--steps 6]

TransformerNet split in two stages (K=2, both on the CPU, as bench_pipeline.py splits it):

- memory, for M in 2, 4, 8, 16: one training step under each schedule, measured with
  :class:`~lightning_gpupar.model_split.saved.SavedActivations` (the peak number of micro-batches whose
  activations are alive on each stage, and the peak bytes autograd saved for backward there); with CUDA,
  the same step on ``cuda:0`` twice also reports ``torch.cuda.max_memory_allocated``;
- speed: the TransformerClassifier trained with ``ModelSplitStrategy(schedule=...)`` for M in 4, 8, the
  schedules interleaved in rounds; the ratio 1F1B / GPipe is taken within each round (target <= 1.05:
  1F1B runs the same work in another order, plus one ``training_step`` call per micro-batch). The
  example's ``training_step`` updates a torchmetrics metric and logs twice: under 1F1B that runs M times
  (torchmetrics' and Lightning's cost, not the schedule's), so the same model with a lean ``training_step``
  (loss only) is measured too: its ratio is the schedule's own share; and the unsplit model run in each
  schedule's order by hand (forward + backward per micro-batch, or every forward first), with no pipeline
  and no Lightning: the same operators, so their ratio is what 1F1B's order alone costs on this machine;
- a traced 1F1B step draws its timeline (``results/pipeline_timeline_1f1b.png``) beside GPipe's.

Writes ``results/schedules_memory.csv`` + ``.png`` and ``results/schedules.csv`` + ``.png``.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import (
    RESULTS,
    add_token_model_arguments,
    fit_step_times,
    interleaved,
    machine,
    pyplot,
    report,
    save_results,
    token_batch,
)
from examples.models import TransformerClassifier, TransformerNet
from lightning_gpupar import ModelSplitStrategy
from lightning_gpupar.model_split import ModelSplit
from lightning_gpupar.model_split.saved import SavedActivations

PLACEMENT = {"embed": 0, "blocks.0-1": 0, "blocks.2-3": 1, "head": 1}
MEMORY_CHUNKS = (2, 4, 8, 16)
SPEED_CHUNKS = (4, 8)
SCHEDULES = ("gpipe", "1f1b")


class LeanClassifier(TransformerClassifier):
    """The example's model and loss, without the per-step metric update and logging."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)


def build(args: argparse.Namespace) -> TransformerNet:
    torch.manual_seed(0)
    return TransformerNet(16, args.d_model, 4, 4, 2, args.seq)


def one_step(net: TransformerNet, split: Any, schedule: str, batch: tuple[torch.Tensor, ...], m: int) -> None:
    """One forward + backward under ``schedule`` (1F1B as the strategy runs it: per-micro-batch losses)."""
    x, y = batch
    if schedule == "gpipe" or split.staged is None:
        torch.nn.functional.cross_entropy(net(x), y).backward()
        return
    xs, ys = x.tensor_split(m), y.tensor_split(m)
    split.staged.run(
        len(xs), lambda i: torch.nn.functional.cross_entropy(net(xs[i]), ys[i]) * (len(xs[i]) / len(x))
    )


def order_step_times(args: argparse.Namespace, chunks: int, interleave: bool, clock: Any) -> list[float]:
    """The unsplit TransformerNet on ``chunks`` micro-batches, no pipeline, no Lightning: each micro-batch's
    forward then its backward (1F1B's order, as gradient accumulation by hand), or every forward, then one
    backward (GPipe's order). Both run the same operators; the ratio is what the order alone costs here."""
    net = build(args)
    x, y = token_batch(args.batch, args.seq)
    xs, ys = x.tensor_split(chunks), y.tensor_split(chunks)
    weights = [len(part) / len(x) for part in xs]
    times = []
    for step in range(args.steps):
        start = clock()
        if interleave:
            for part, target, weight in zip(xs, ys, weights, strict=True):
                (torch.nn.functional.cross_entropy(net(part), target) * weight).backward()
        else:
            losses = [
                torch.nn.functional.cross_entropy(net(p), t) * w
                for p, t, w in zip(xs, ys, weights, strict=True)
            ]
            torch.stack(losses).sum().backward()
        if step >= 3:
            times.append(clock() - start)
    return times


def memory(args: argparse.Namespace, batch: tuple[torch.Tensor, ...], device: torch.device) -> dict[str, Any]:
    """Per (schedule, M): peak micro-batches alive and saved bytes per stage, and CUDA peak bytes."""
    found: dict[str, Any] = {}
    for schedule in SCHEDULES:
        for m in MEMORY_CHUNKS:
            net = build(args)
            split = ModelSplit(PLACEMENT, chunks=m, schedule=schedule).apply(
                net, [device, device], f"{schedule} M={m}"
            )
            on = tuple(t.to(device) for t in batch)
            one_step(net, split, schedule, on, m)  # warm-up (and the chain check)
            net.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
            pipeline = split.pipeline
            assert pipeline is not None
            with SavedActivations(pipeline) as saved:
                one_step(net, split, schedule, on, m)
            cuda_peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            found[f"{schedule} M={m}"] = (saved.peak_microbatches, saved.peak_bytes, cuda_peak)
            split.remove()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_token_model_arguments(parser, rounds=5)
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="step time as this process's CPU time (default: on a shared machine, time other tenants hold "
        "the cores stays out; one torch thread runs everything here) or wall time",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = token_batch(args.batch, args.seq)

    # ------------------------------------------------------------------------------------ memory
    title = f"GPipe vs 1F1B activations, K=2, TransformerNet d_model={args.d_model} x4, batch {args.batch}"
    print(f"\n## {title}\nmachine: {machine()}")
    measured = memory(args, batch, torch.device("cpu"))
    rows: list[tuple[str, str, float]] = []
    for name, (alive, saved, _) in measured.items():
        for stage in sorted(alive):
            rows.append((f"micro-batches alive, stage {stage}", name, alive[stage]))
            rows.append((f"saved KiB, stage {stage}", name, round(saved[stage] / 1024, 1)))
        print(
            f"  {name:<12} micro-batches alive per stage {alive}, saved KiB per stage "
            f"{ {s: round(b / 1024, 1) for s, b in saved.items()} }"
        )
    if torch.cuda.is_available():
        for name, (_, _, peak) in memory(args, batch, torch.device("cuda", 0)).items():
            rows.append(
                ("cuda max_memory_allocated MiB (both stages on cuda:0)", name, round(peak / 2**20, 2))
            )
            print(f"  {name:<12} cuda:0 max_memory_allocated {peak / 2**20:.2f} MiB")
    k, m = 2, 8
    ratio = measured[f"1f1b M={m}"][1][0] / measured[f"gpipe M={m}"][1][0]
    ratios = {f"stage-0 saved bytes 1F1B/GPipe, M={m} (target <= {k / m * 1.05:.3f})": ratio}
    print(f"  stage-0 saved bytes 1F1B/GPipe at M={m}: {ratio:.3f} (K/M = {k / m:.3f})")
    print(f"  written: {save_results('schedules_memory', title, rows, ratios, chart=False)[0]}")
    plot_memory(measured, title)

    # ------------------------------------------------------------------------------------ speed
    n = args.batch * 8
    data = TensorDataset(*token_batch(n, args.seq))
    loader = DataLoader(data, batch_size=args.batch)
    cpu = torch.device("cpu")

    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    def variant(schedule: str, chunks: int, lean: bool = False) -> Any:
        def measure() -> list[float]:
            torch.manual_seed(0)
            model = LeanClassifier if lean else TransformerClassifier
            module = model(d_model=args.d_model, num_layers=4, max_len=args.seq)
            strategy = ModelSplitStrategy(
                {f"model.{p}": d for p, d in PLACEMENT.items()},
                chunks=chunks,
                schedule=schedule,
                parallel_devices=[cpu, cpu],
            )
            return fit_step_times(module, loader, args.steps, clock, strategy=strategy, accelerator="cpu")

        return measure

    variants = {f"{s} chunks={c} (CPU)": variant(s, c) for c in SPEED_CHUNKS for s in SCHEDULES}
    for c in SPEED_CHUNKS:
        for interleave, label in ((False, "all forwards first"), (True, "forward+backward each")):
            variants[f"unsplit chunks={c}, {label}"] = functools.partial(
                order_step_times, args, c, interleave, clock
            )
    variants.update(
        {f"{s} chunks={c} lean step (CPU)": variant(s, c, True) for c in SPEED_CHUNKS for s in SCHEDULES}
    )
    speed = {
        f"1f1b/gpipe chunks={c} CPU (target <= 1.05)": (f"1f1b chunks={c} (CPU)", f"gpipe chunks={c} (CPU)")
        for c in SPEED_CHUNKS
    }
    speed.update(
        {
            f"1f1b/gpipe chunks={c} lean step (target <= 1.05)": (
                f"1f1b chunks={c} lean step (CPU)",
                f"gpipe chunks={c} lean step (CPU)",
            )
            for c in SPEED_CHUNKS
        }
    )
    speed.update(
        {
            f"1F1B's order alone, unsplit, chunks={c} (no goal)": (
                f"unsplit chunks={c}, forward+backward each",
                f"unsplit chunks={c}, all forwards first",
            )
            for c in SPEED_CHUNKS
        }
    )
    title = (
        f"GPipe vs 1F1B step time ({args.clock} clock), K=2 on one CPU, TransformerClassifier "
        f"d_model={args.d_model}"
    )
    report(title, interleaved(variants, args.rounds), speed, name="schedules")

    # ------------------------------------------------------------------------------------ timeline
    traced = build(args)
    split = ModelSplit(PLACEMENT, chunks=4, schedule="1f1b", trace=str(RESULTS / "pipeline_timeline_1f1b"))
    applied = split.apply(traced, [cpu, cpu], "trace 1f1b")
    for _ in range(4):  # one warm-up step, three recorded
        one_step(traced, applied, "1f1b", batch, 4)
    applied.remove()  # writes the trace, the timeline and the measured bubble


def plot_memory(measured: dict[str, Any], title: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=80)
    for schedule, marker in zip(SCHEDULES, "os", strict=True):
        for stage, style in ((0, "-"), (1, "--")):
            alive = [measured[f"{schedule} M={m}"][0][stage] for m in MEMORY_CHUNKS]
            kib = [measured[f"{schedule} M={m}"][1][stage] / 1024 for m in MEMORY_CHUNKS]
            label = f"{schedule}, stage {stage}"
            left.plot(MEMORY_CHUNKS, alive, marker + style, label=label)
            right.plot(MEMORY_CHUNKS, kib, marker + style, label=label)
    for ax, ylabel in ((left, "micro-batches alive (peak)"), (right, "saved for backward, KiB (peak)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(MEMORY_CHUNKS, [str(m) for m in MEMORY_CHUNKS])
        ax.set_xlabel("micro-batches M")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(RESULTS / "schedules_memory.png")
    plt.close(fig)
    print(f"  written: {RESULTS / 'schedules_memory.png'}")


if __name__ == "__main__":
    main()
