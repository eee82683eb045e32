"""ModelSplitStrategy step time: a 2-stage split against the unsplit model, chunks=4 against chunks=1.

    python benchmarks/bench_split.py [--rounds 3] [--steps 20]

Both stages sit on the CPU (and, where a GPU exists, both on cuda:0), so the ratios measure the split's
own overhead (hooks, micro-batching, concatenation), not a multi-device speed-up. Target: split / unsplit
<= 1.03. The stage times printed at the end feed the speed-up estimate in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch.utils.data import DataLoader, TensorDataset

import lightning_gpupar  # noqa: F401
from benchmarks.common import fit_step_times, interleaved, report
from examples.models import TransformerClassifier
from lightning_gpupar import ModelSplitStrategy

PLACEMENT = {"model.embed": 0, "model.blocks.0-1": 0, "model.blocks.2-3": 1, "model.head": 1}


def stage_times(args: argparse.Namespace, device: torch.device, repeats: int = 10) -> list[float]:
    """Forward + backward seconds of each stage of the split, on one batch."""
    net = TransformerClassifier(d_model=args.d_model, num_layers=4, max_len=args.seq).model.to(device)
    stages = [[net.embed, net.blocks[0], net.blocks[1]], [net.blocks[2], net.blocks[3], net.head]]
    hidden = net.embed(torch.randint(0, 16, (args.batch, args.seq), device=device)).detach()
    times = []
    for k, stage in enumerate(stages):
        x: Any = torch.randint(0, 16, (args.batch, args.seq), device=device) if k == 0 else hidden
        samples = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = x
            for module in stage:
                out = module(out)
            out.float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            samples.append(time.perf_counter() - start)
        times.append(sorted(samples)[len(samples) // 2])
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    args = parser.parse_args()

    g = torch.Generator().manual_seed(0)
    n = args.batch * 8
    data = TensorDataset(
        torch.randint(0, 16, (n, args.seq), generator=g), torch.randint(0, 2, (n,), generator=g)
    )
    loader = DataLoader(data, batch_size=args.batch)

    def variant(strategy: Any = "auto", **kwargs: Any) -> Any:
        def measure() -> list[float]:
            torch.manual_seed(0)
            module = TransformerClassifier(d_model=args.d_model, num_layers=4, max_len=args.seq)
            chosen = strategy() if callable(strategy) else strategy
            return fit_step_times(module, loader, args.steps, strategy=chosen, **kwargs)

        return measure

    cpu = torch.device("cpu")
    variants = {
        "unsplit (CPU)": variant(accelerator="cpu", devices=1),
        "split 2 stages, chunks=1 (CPU)": variant(
            lambda: ModelSplitStrategy(PLACEMENT, chunks=1, parallel_devices=[cpu, cpu]), accelerator="cpu"
        ),
        "split 2 stages, chunks=4 (CPU)": variant(
            lambda: ModelSplitStrategy(PLACEMENT, chunks=4, parallel_devices=[cpu, cpu]), accelerator="cpu"
        ),
    }
    ratios = {
        "split/unsplit CPU (target <= 1.03)": ("split 2 stages, chunks=1 (CPU)", "unsplit (CPU)"),
        "chunks=4/chunks=1 CPU (target <= 1.10)": (
            "split 2 stages, chunks=4 (CPU)",
            "split 2 stages, chunks=1 (CPU)",
        ),
    }
    if torch.cuda.is_available():
        gpu = torch.device("cuda", 0)
        variants["unsplit (cuda:0)"] = variant(accelerator="gpu", devices=[0])
        for chunks in (1, 4):
            variants[f"split 2 stages, chunks={chunks} (cuda:0 twice)"] = variant(
                lambda c=chunks: ModelSplitStrategy(PLACEMENT, chunks=c, parallel_devices=[gpu, gpu]),
                accelerator="gpu",
            )
        ratios["split/unsplit cuda:0 (target <= 1.03)"] = (
            "split 2 stages, chunks=1 (cuda:0 twice)",
            "unsplit (cuda:0)",
        )
        ratios["chunks=4/chunks=1 cuda:0"] = (
            "split 2 stages, chunks=4 (cuda:0 twice)",
            "split 2 stages, chunks=1 (cuda:0 twice)",
        )
    else:
        print("CUDA variant skipped: no GPU visible.")

    medians = interleaved(variants, args.rounds)
    report(
        f"ModelSplitStrategy, TransformerNet d_model={args.d_model} x4 layers, batch {args.batch}x{args.seq}",
        medians,
        ratios,
        name="split",
    )
    for device in [cpu] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else []):
        first, second = stage_times(args, device)
        print(f"  stage times on {device} (fwd+bwd, one batch): {first * 1e3:.2f} ms, {second * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
