"""DDPStrategy throughput: ours against Lightning's "ddp" and a plain torch DDP loop, 2 CPU processes;
and ddp_split (the same 2 processes, each owning 2 CPU devices with its model copy split over them).

    python benchmarks/bench_ddp.py [--rounds 3] [--steps 40] [--devices 2]

Each variant is a fresh 2-process run of this script (``--worker NAME``) training the same MLP on the
same data with the same per-rank batch; rank 0 reports its step times. Runs are interleaved
(ours, lightning, torch, ddp_split, ours, ...) and the median step is compared. Target: ours >= 0.97x
Lightning's. ddp_split runs the same global batch; on CPU devices its split can only add hook overhead.
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

from benchmarks.common import fit_step_times, machine, save_results
from lightning_gpupar import DDPSplitStrategy, DDPStrategy

VARIANTS = ("ours", "lightning", "torch", "ddp_split")
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


def run_worker(name: str, args: argparse.Namespace) -> list[float]:
    """Start one variant as a fresh process tree and return rank 0's step times."""
    cmd = [sys.executable, __file__, "--worker", name, "--steps", str(args.steps)]
    cmd += ["--batch", str(args.batch), "--devices", str(args.devices)]
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "MASTER_PORT", "WORLD_SIZE")}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    lines = [line for line in out.stdout.splitlines() if line.startswith(RESULT)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{name} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return list(json.loads(lines[0].removeprefix(RESULT)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128, help="per process")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--worker", choices=VARIANTS, default=None)
    args = parser.parse_args()

    if args.worker == "ours":
        return lightning_worker(DDPStrategy(), args)
    if args.worker == "lightning":
        return lightning_worker("ddp", args)
    if args.worker == "ddp_split":
        return lightning_worker(DDPSplitStrategy(devices_per_process=2), args, devices_per_process=2)
    if args.worker == "torch":
        from lightning.fabric.plugins.environments.lightning import find_free_network_port

        mp.spawn(torch_worker, args=(args, find_free_network_port()), nprocs=args.devices)
        return None

    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            samples[name] += run_worker(name, args)
    median = {name: statistics.median(times) for name, times in samples.items()}
    print(f"\n## DDP, {args.devices} CPU processes, batch {args.batch} per process, {args.rounds} rounds")
    print(f"machine: {machine()}")
    for name in VARIANTS:
        print(f"  {name:<10} {1 / median[name]:8.2f} steps/s  ({median[name] * 1e3:.2f} ms/step)")
    print(f"  ratio ours / lightning  {median['lightning'] / median['ours']:.3f}  (steps/s; target >= 0.97)")
    print(f"  ratio ours / torch loop {median['torch'] / median['ours']:.3f}")
    print(f"  ratio lightning / torch {median['torch'] / median['lightning']:.3f}")
    print(
        f"  ratio ddp_split (2x2 CPU devices) / ddp (2 processes) {median['ours'] / median['ddp_split']:.3f}"
    )
    ratios = {  # steps/s against steps/s
        "ours / Lightning ddp (target >= 0.97)": median["lightning"] / median["ours"],
        "ours / torch DDP loop": median["torch"] / median["ours"],
        "Lightning / torch DDP loop": median["torch"] / median["lightning"],
        "ddp_split / ddp": median["ours"] / median["ddp_split"],
    }
    rows = [("ms/step", name, round(median[name] * 1e3, 3)) for name in VARIANTS]
    title = f"DDP, {args.devices} CPU processes, batch {args.batch} per process (ratios of steps/s)"
    for path in save_results("ddp", title, rows, ratios):
        if path is not None:
            print(f"  written: {path}")
    return None


if __name__ == "__main__":
    main()
