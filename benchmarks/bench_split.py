"""ModelSplitStrategy step time: a 2-stage split against the unsplit model, chunks=4 against chunks=1.

    python benchmarks/bench_split.py [--rounds 15] [--steps 10] [--threads 1]

Both stages sit on the CPU (and, where a GPU exists, both on cuda:0), so the ratios measure the split's
own overhead (hooks, micro-batching, concatenation), not a multi-device speed-up. Targets: split / unsplit
<= 1.03, chunks=4 / chunks=1 <= 1.10. The latter holds two costs, told apart by a fourth variant, the
unsplit module computing its batch as 4 micro-batches itself (no strategy): what torch's kernels pay for
smaller matrices (``by hand / unsplit``), and what the pipeline adds on top (``chunks=4 / by hand``).
The stage times printed at the end feed the speed-up estimate in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from torch import Tensor
from torch.utils.data import DataLoader, TensorDataset

import lightning_gpupar  # noqa: F401
from benchmarks.common import fit_step_times, interleaved, report, stage_group_times
from examples.models import TransformerClassifier, TransformerNet
from lightning_gpupar import ModelSplitStrategy

PLACEMENT = {"model.embed": 0, "model.blocks.0-1": 0, "model.blocks.2-3": 1, "model.head": 1}
#: The two stages of ``PLACEMENT``, as paths inside the network.
STAGES = [["embed", "blocks.0", "blocks.1"], ["blocks.2", "blocks.3", "head"]]


class MicroBatchedByHand(TransformerClassifier):
    """The unsplit classifier running its network on ``chunks`` micro-batches in turn: torch's own cost of
    micro-batching, with no strategy and nothing of this library in the step."""

    def __init__(self, chunks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.chunks = chunks

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.model(part) for part in x.chunk(self.chunks)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: steady on a shared machine; 0: torch's)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    g = torch.Generator().manual_seed(0)
    n = args.batch * 8
    data = TensorDataset(
        torch.randint(0, 16, (n, args.seq), generator=g), torch.randint(0, 2, (n,), generator=g)
    )
    loader = DataLoader(data, batch_size=args.batch)

    def variant(strategy: Any = "auto", by_hand: int = 0, **kwargs: Any) -> Any:
        def measure() -> list[float]:
            torch.manual_seed(0)
            sizes: dict[str, Any] = dict(d_model=args.d_model, num_layers=4, max_len=args.seq)
            module = MicroBatchedByHand(by_hand, **sizes) if by_hand else TransformerClassifier(**sizes)
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
        "unsplit, 4 micro-batches by hand (CPU)": variant(by_hand=4, accelerator="cpu", devices=1),
    }
    ratios = {
        "split/unsplit CPU (target <= 1.03)": ("split 2 stages, chunks=1 (CPU)", "unsplit (CPU)"),
        "chunks=4/chunks=1 CPU (target <= 1.10)": (
            "split 2 stages, chunks=4 (CPU)",
            "split 2 stages, chunks=1 (CPU)",
        ),
        "by hand/unsplit CPU (torch's micro-batch cost)": (
            "unsplit, 4 micro-batches by hand (CPU)",
            "unsplit (CPU)",
        ),
        "chunks=4/by hand CPU (pipeline, target <= 1.03)": (
            "split 2 stages, chunks=4 (CPU)",
            "unsplit, 4 micro-batches by hand (CPU)",
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

    per_round = interleaved(variants, args.rounds)
    report(
        f"ModelSplitStrategy, TransformerNet d_model={args.d_model} x4 layers, "
        f"batch {args.batch}x{args.seq}, {torch.get_num_threads()} torch thread(s)",
        per_round,
        ratios,
        name="split" if torch.get_num_threads() == 1 else f"split_{torch.get_num_threads()}threads",
    )
    for device in [cpu] + ([torch.device("cuda", 0)] if torch.cuda.is_available() else []):
        net = TransformerNet(16, args.d_model, 4, 4, 2, args.seq).to(device)  # TransformerClassifier's
        tokens = torch.randint(0, 16, (args.batch, args.seq), device=device)
        first, second = stage_group_times(net, STAGES, tokens, device, repeats=10)
        print(f"  stage times on {device} (fwd+bwd, one batch): {first * 1e3:.2f} ms, {second * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
