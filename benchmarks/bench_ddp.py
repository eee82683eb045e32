"""DDPStrategy throughput: ours against Lightning's "ddp" and a plain torch DDP loop, 2 CPU processes;
and ddp_split (the same 2 processes, each owning 2 CPU devices with its model copy split over them).

    python benchmarks/bench_ddp.py [--pairs 20] [--rounds 3] [--steps 40] [--devices 2]

Ours against Lightning's: one 2-process run of this script (``--worker paired``) fits the same MLP on the
same data ``--pairs`` times with each strategy, alternating (ours, Lightning, Lightning, ours, ...), in
the same processes and process group, so the two differ only by strategy; the ratio is the median of the
pairs' ratios. Target: ours within 2 % of Lightning's (>= 0.98). The torch loop and ddp_split rows are
fresh 2-process runs (``--worker NAME``), ``--rounds`` of each; ddp_split runs the same global batch, and
on CPU devices its split can only add hook overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from benchmarks.common import fit_step_times, machine, paired_ratio, save_results
from lightning_gpupar import DDPSplitStrategy, DDPStrategy

VARIANTS = ("ours", "lightning", "torch", "ddp_split")
#: Variants run as fresh process trees; ours and Lightning's run side by side in one (``paired``).
FRESH = ("torch", "ddp_split")
WARMUP = 3
RESULT = "BENCH_RESULT "


def make_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(256, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10)
    )


def make_data(batch: int, steps: int, world: int) -> TensorDataset:
    n = batch * world * (steps + 1)
    g = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(n, 256, generator=g), torch.randint(0, 10, (n,), generator=g))


class Net(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = make_net()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def lightning_worker(strategy: Any, args: argparse.Namespace, devices_per_process: int = 1) -> None:
    """One Lightning run; Lightning's launcher re-runs this script for the other ranks."""
    loader = DataLoader(make_data(args.batch, args.steps, args.devices), batch_size=args.batch)
    devices = args.devices * devices_per_process
    times = fit_step_times(Net(), loader, args.steps, accelerator="cpu", devices=devices, strategy=strategy)
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(RESULT + json.dumps(times), flush=True)


def paired_worker(args: argparse.Namespace) -> None:
    """Fit with our DDPStrategy and Lightning's in turn, ``args.pairs`` times each, in these processes."""
    loader = DataLoader(make_data(args.batch, args.steps, args.devices), batch_size=args.batch)
    medians: dict[str, list[float]] = {"ours": [], "lightning": []}
    for pair in range(args.pairs):
        for name in ("ours", "lightning") if pair % 2 == 0 else ("lightning", "ours"):
            strategy = DDPStrategy() if name == "ours" else "ddp"
            times = fit_step_times(
                Net(), loader, args.steps, accelerator="cpu", devices=args.devices, strategy=strategy
            )
            medians[name].append(statistics.median(times))
    if int(os.environ.get("LOCAL_RANK", 0)) == 0:
        print(RESULT + json.dumps(medians), flush=True)


def torch_worker(rank: int, args: argparse.Namespace, port: int) -> None:
    """The same training as a hand-written torch DDP loop (what Lightning's overhead is measured against)."""
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // args.devices))  # as Lightning does per process
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=args.devices)
    data = make_data(args.batch, args.steps, args.devices)
    sampler: DistributedSampler[int] = DistributedSampler(
        data, num_replicas=args.devices, rank=rank, shuffle=True, seed=0
    )
    loader = DataLoader(data, batch_size=args.batch, sampler=sampler)
    model = DistributedDataParallel(make_net())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    times = []
    for step, (x, y) in enumerate(loader):
        if step == args.steps:
            break
        start = time.perf_counter()
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        if step >= WARMUP:
            times.append(time.perf_counter() - start)
    if rank == 0:
        print(RESULT + json.dumps(times), flush=True)
    dist.barrier()  # leave together: a rank tearing down while its peer still talks can hang gloo
    dist.destroy_process_group()


def run_worker(name: str, args: argparse.Namespace) -> Any:
    """Start one worker as a fresh process tree and return what rank 0 reported."""
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps), "--pairs", str(args.pairs)]
    cmd += ["--batch", str(args.batch), "--devices", str(args.devices)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[0].removeprefix(RESULT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--pairs", type=int, default=20, help="fits of ours and of Lightning's, side by side")
    parser.add_argument("--rounds", type=int, default=3, help="fresh runs of the torch loop and ddp_split")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128, help="per process")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--worker", choices=("paired", *FRESH), default=None)
    args = parser.parse_args()

    if args.worker == "paired":
        return paired_worker(args)
    if args.worker == "ddp_split":
        return lightning_worker(DDPSplitStrategy(devices_per_process=2), args, devices_per_process=2)
    if args.worker == "torch":
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        mp.spawn(torch_worker, args=(args, find_free_network_port()), nprocs=args.devices)
        return None

    paired: dict[str, list[float]] = run_worker("paired", args)
    fresh: dict[str, list[float]] = {name: [] for name in FRESH}
    for _ in range(args.rounds):
        for name in FRESH:
            fresh[name] += run_worker(name, args)
    median = {name: statistics.median(paired[name]) for name in paired}
    median.update({name: statistics.median(times) for name, times in fresh.items()})
    pair_ratios = paired_ratio(paired, "lightning", "ours")  # steps/s, ours over Lightning's, per pair
    ours_vs_lightning = statistics.median(pair_ratios)
    print(f"\n## DDP, {args.devices} CPU processes, batch {args.batch} per process")
    print(f"machine: {machine()}")
    for name in VARIANTS:
        print(f"  {name:<10} {1 / median[name]:8.2f} steps/s  ({median[name] * 1e3:.2f} ms/step)")
    print(
        f"  ratio ours / lightning  {ours_vs_lightning:.3f}  (steps/s, median of {args.pairs} side-by-side "
        f"pairs, range {pair_ratios[0]:.3f}..{pair_ratios[-1]:.3f}; target >= 0.98)"
    )
    print(f"  ratio ours / torch loop {median['torch'] / median['ours']:.3f}")
    print(f"  ratio lightning / torch {median['torch'] / median['lightning']:.3f}")
    print(
        f"  ratio ddp_split (2x2 CPU devices) / ddp (2 processes) {median['ours'] / median['ddp_split']:.3f}"
    )
    target = "ours / Lightning ddp (target >= 0.98)"
    ratios = {  # steps/s against steps/s
        target: ours_vs_lightning,
        "ours / torch DDP loop": median["torch"] / median["ours"],
        "Lightning / torch DDP loop": median["torch"] / median["lightning"],
        "ddp_split / ddp": median["ours"] / median["ddp_split"],
    }
    rows = [("ms/step", name, round(median[name] * 1e3, 3)) for name in VARIANTS]
    title = (
        f"DDP, {args.devices} CPU processes, batch {args.batch} per process (ratios of steps/s; ours and "
        f"Lightning's side by side in {args.pairs} pairs)"
    )
    ranges = {target: (pair_ratios[0], pair_ratios[-1])}
    for path in save_results("ddp", title, rows, ratios, ranges=ranges):
        if path is not None:
            print(f"  written: {path}")
    return None


if __name__ == "__main__":
    main()
