"""The pipeline as chunks grows: measured CPU step time and the modelled time on K separate devices.

    python benchmarks/bench_pipeline.py [--rounds 2] [--steps 6]

TransformerNet split in two stages (K=2, both on the CPU), trained with a plain loop (forward, backward,
Adam step) for chunks M in 1, 2, 4, 8, interleaved. For each M the script also times each stage's forward
+ backward on one micro-batch (batch / M samples) and models the step on K separate devices with GPipe's
formula: (M + K - 1) ticks of the slowest stage's micro-batch time. Both are reported as speed-up over the
naive split (M=1, the stages taking turns): on one CPU the measured speed-up stays <= 1 (nothing can
overlap), the modelled one shows what separate devices would give. A chunks=4 run traced with
``trace=results/pipeline_timeline`` draws the schedule. The machine is shared, so the numbers are noisy:
compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from benchmarks.common import (
    RESULTS,
    add_token_model_arguments,
    machine,
    pyplot,
    save_results,
    stage_group_times,
    token_batch,
)
from examples.models import TransformerNet
from lightning_gpupar.model_split import ModelSplit

PLACEMENT = {"embed": 0, "blocks.0-1": 0, "blocks.2-3": 1, "head": 1}
STAGES = [["embed", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "head"]]
CHUNKS = (1, 2, 4, 8)


def build(args: argparse.Namespace) -> TransformerNet:
    torch.manual_seed(0)
    return TransformerNet(16, args.d_model, 4, 4, 2, args.seq)


def step_times(net: TransformerNet, batch: tuple[torch.Tensor, torch.Tensor], steps: int) -> list[float]:
    """Seconds of each training step after one warm-up step."""
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    x, y = batch
    times = []
    for step in range(steps + 1):
        start = time.perf_counter()
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        if step:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    add_token_model_arguments(parser, rounds=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    batch = token_batch(args.batch, args.seq)
    cpu = torch.device("cpu")
    nets = {}
    for chunks in CHUNKS:
        nets[chunks] = build(args)
        ModelSplit(PLACEMENT, chunks=chunks).apply(nets[chunks], [cpu, cpu], f"chunks={chunks}")
    measured: dict[int, list[float]] = {m: [] for m in CHUNKS}
    modelled: dict[int, list[float]] = {m: [] for m in CHUNKS}
    reference = build(args)
    for _ in range(args.rounds):
        for m in CHUNKS:
            measured[m] += step_times(nets[m], batch, args.steps)
            per_micro_batch = stage_group_times(reference, STAGES, batch[0][: max(1, args.batch // m)], cpu)
            k = len(STAGES)
            modelled[m].append((m + k - 1) * max(per_micro_batch) if m > 1 else sum(per_micro_batch))
    step = {m: statistics.median(v) for m, v in measured.items()}
    model = {m: statistics.median(v) for m, v in modelled.items()}
    title = f"pipeline K=2, TransformerNet d_model={args.d_model} x4, batch {args.batch}x{args.seq}"
    print(f"\n## {title}\nmachine: {machine()}")
    rows: list[tuple[str, str, float]] = []
    ratios: dict[str, float] = {}
    for m in CHUNKS:
        print(
            f"  chunks={m}: measured {step[m] * 1e3:8.2f} ms/step (one CPU), modelled on 2 devices "
            f"{model[m] * 1e3:8.2f} ms (fwd+bwd, GPipe ticks); speed-up over the naive split: measured "
            f"{step[1] / step[m]:.2f}x, modelled {model[1] / model[m]:.2f}x"
        )
        rows += [("ms/step measured", f"chunks={m}", round(step[m] * 1e3, 3))]
        rows += [("ms modelled fwd+bwd on 2 devices", f"chunks={m}", round(model[m] * 1e3, 3))]
        ratios[f"chunks={m} measured speed-up (1 CPU)"] = step[1] / step[m]
        ratios[f"chunks={m} modelled speed-up (2 devices)"] = model[1] / model[m]
    print(f"  written: {save_results('pipeline', title, rows, ratios, chart=False)[0]}")
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(6, 3.6), dpi=80)
        ax.plot(CHUNKS, [step[1] / step[m] for m in CHUNKS], "o-", label="measured, both stages on 1 CPU")
        ax.plot(CHUNKS, [model[1] / model[m] for m in CHUNKS], "s-", label="modelled, 2 devices (GPipe)")
        ideal = [2 * m / (m + 1) for m in CHUNKS]  # K M / (M + K - 1): no per-micro-batch cost
        ax.plot(CHUNKS, ideal, ":", color="grey", label="ideal 2M/(M+1)")
        ax.axhline(1.0, color="red", linewidth=1, label="naive split (target: above)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(CHUNKS, [str(m) for m in CHUNKS])
        ax.set_xlabel("chunks (micro-batches M)")
        ax.set_ylabel("speed-up over chunks=1")
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(RESULTS / "pipeline.png")
        plt.close(fig)
        print(f"  written: {RESULTS / 'pipeline.png'}")
    traced = build(args)  # the timeline picture of one chunks=4 step
    timeline = ModelSplit(PLACEMENT, chunks=4, trace=str(RESULTS / "pipeline_timeline"))
    split = timeline.apply(traced, [cpu, cpu], "trace")
    step_times(traced, batch, 4)  # one warm-up step, three recorded
    split.remove()  # writes the trace, the timeline and the numbers


if __name__ == "__main__":
    main()
