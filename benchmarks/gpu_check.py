"""``make gpu-check``: prove a GPU machine in one command, in under 8 minutes.

    python benchmarks/gpu_check.py [--steps 30] [--pytest-timeout 300]

On whatever GPUs the machine has (one is enough; two or more unlock the multi-GPU cases):

1. the CUDA tests (``pytest -m cuda``);
2. the GPU rows of every benchmark: dp on one GPU against Lightning's single device (and on two GPUs),
   model_split CPU+GPU and GPU+GPU, the pipeline with CUDA streams (``chunks=4``), DDP with NCCL;
3. the peak memory of each GPU under each of them (``torch.cuda.max_memory_allocated``).

It writes one Markdown report, with the machine line, to ``benchmarks/results/gpu-check-<date>.md`` (and
into ``$OUT`` when that is set) and exits non-zero when a test or a benchmark failed. Without a GPU it
says so and exits with status 2: there is nothing to prove.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

NO_GPU_EXIT = 2
RESULTS = ROOT / "benchmarks" / "results"
MiB = 2**20


@dataclass
class Row:
    """One benchmark variant: median step time and each GPU's peak allocated memory."""

    name: str
    devices: str
    ms_per_step: float | None = None
    peaks: dict[str, int] = field(default_factory=dict)
    error: str | None = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="training steps per benchmark variant")
    parser.add_argument("--pytest-timeout", type=float, default=300, help="seconds for pytest -m cuda")
    parser.add_argument("--ddp-worker", metavar="DIR", help=argparse.SUPPRESS)  # a rank of the NCCL row
    args = parser.parse_args(argv)
    if args.ddp_worker:
        return _ddp_worker(Path(args.ddp_worker), args.steps)

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        print(
            f"gpu-check: found no CUDA GPU (torch {torch.__version__}, CUDA build: "
            f"{'yes' if torch.version.cuda else 'no'}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), so there is nothing to check. Run "
            "`make gpu-check` on a machine with at least one GPU."
        )
        return NO_GPU_EXIT

    started = time.monotonic()
    tests_ok, tests_text = _cuda_tests(args.pytest_timeout)
    rows = _benchmarks(count, args.steps)
    report = _report(count, tests_ok, tests_text, rows, time.monotonic() - started)
    for path in _write(report):
        print(f"gpu-check: report written to {path}")
    print(report)
    return 0 if tests_ok and not any(r.error for r in rows) else 1


# -- 1. the CUDA tests ---------------------------------------------------------------------------------


def _cuda_tests(timeout: float) -> tuple[bool, str]:
    """Run ``pytest -m cuda``; whether it passed, and its summary and failures."""
    command = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rfEs", "-p", "no:cacheprovider", "tests"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = err.stdout.decode() if isinstance(err.stdout, bytes) else (err.stdout or "")
        return False, f"pytest -m cuda did not finish within {timeout:.0f} s.\n{out[-3000:]}"
    lines = done.stdout.strip().splitlines()
    keep = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    summary = lines[-1] if lines else done.stderr.strip()[-500:]
    return done.returncode == 0, "\n".join([summary, *keep])


# -- 2. the GPU benchmark rows -------------------------------------------------------------------------


def _benchmarks(count: int, steps: int) -> list[Row]:
    from lightning.pytorch import LightningModule
    from torch.utils.data import DataLoader, TensorDataset

    import lightning_gpupar  # noqa: F401  (registers "dp")
    from benchmarks.bench_dp import Net as MLP
    from benchmarks.bench_split import PLACEMENT
    from examples.models import TransformerClassifier
    from lightning_gpupar import ModelSplitStrategy

    g = torch.Generator().manual_seed(0)
    mlp_data = DataLoader(
        TensorDataset(torch.randn(512 * 8, 256, generator=g), torch.randint(0, 10, (512 * 8,), generator=g)),
        batch_size=512,
    )
    tokens = DataLoader(
        TensorDataset(
            torch.randint(0, 16, (64 * 8, 32), generator=g), torch.randint(0, 2, (64 * 8,), generator=g)
        ),
        batch_size=64,
    )
    cpu, gpu0 = torch.device("cpu"), torch.device("cuda", 0)
    gpu1 = torch.device("cuda", 1) if count > 1 else None

    def mlp() -> LightningModule:
        return MLP(1024)

    def transformer() -> LightningModule:
        torch.manual_seed(0)
        return TransformerClassifier(d_model=128, num_layers=4, max_len=32)

    def split(devices: list[torch.device], chunks: int, output: int | None = None) -> Callable[[], Any]:
        return lambda: ModelSplitStrategy(
            PLACEMENT, chunks=chunks, output_device=output, parallel_devices=devices
        )

    variants: list[tuple[str, str, Callable[[], LightningModule], Any, dict[str, Any]]] = [
        ("Lightning single device", "cuda:0", mlp, mlp_data, {"devices": [0]}),
        ("dp, 1 GPU", "cuda:0", mlp, mlp_data, {"strategy": "dp", "devices": [0]}),
        ("unsplit TransformerNet", "cuda:0", transformer, tokens, {"devices": [0]}),
        (
            "model_split GPU+CPU, chunks=1",
            "cuda:0, cpu",
            transformer,
            tokens,
            {"strategy": split([gpu0, cpu], 1, output=0)},
        ),
        (
            "model_split cuda:0 twice, chunks=4",
            "cuda:0, cuda:0",
            transformer,
            tokens,
            {"strategy": split([gpu0, gpu0], 4)},
        ),
    ]
    if gpu1 is not None:
        variants += [
            ("dp, 2 GPUs", "cuda:0, cuda:1", mlp, mlp_data, {"strategy": "dp", "devices": [0, 1]}),
            (
                "model_split GPU+GPU, chunks=1",
                "cuda:0, cuda:1",
                transformer,
                tokens,
                {"strategy": split([gpu0, gpu1], 1)},
            ),
            (
                "pipeline GPU+GPU, chunks=4 (CUDA streams)",
                "cuda:0, cuda:1",
                transformer,
                tokens,
                {"strategy": split([gpu0, gpu1], 4)},
            ),
        ]
    rows = [
        _measure(name, devices, make, loader, steps, **kwargs)
        for name, devices, make, loader, kwargs in variants
    ]
    if gpu1 is not None:
        rows.append(_ddp_nccl(steps))
    return rows


def _measure(name: str, where: str, make: Callable[[], Any], loader: Any, steps: int, **kwargs: Any) -> Row:
    """Fit ``steps`` steps on the GPU(s) with the Trainer arguments ``kwargs``; never raises."""
    from benchmarks.common import fit_step_times

    row = Row(name, where)
    _reset_peaks()
    try:
        strategy = kwargs.pop("strategy", "auto")
        strategy = strategy() if callable(strategy) else strategy
        times = fit_step_times(make(), loader, steps, accelerator="gpu", strategy=strategy, **kwargs)
        row.ms_per_step = statistics.median(times) * 1e3
    except Exception:
        row.error = traceback.format_exc(limit=3).strip().splitlines()[-1]
    row.peaks = _peaks()
    return row


def _ddp_nccl(steps: int) -> Row:
    """DDP over cuda:0 and cuda:1 with NCCL: two processes (this script re-run by Lightning's launcher)."""
    row = Row("ddp (NCCL), 2 processes", "cuda:0, cuda:1")
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, str(Path(__file__).resolve()), "--ddp-worker", out, "--steps", str(steps)]
        env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
            results = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]
        except Exception:
            row.error = traceback.format_exc(limit=1).strip().splitlines()[-1]
            if "done" in locals():
                row.error += " | " + done.stderr.strip()[-300:].replace("\n", " ")
            return row
    row.ms_per_step = results[0]["ms_per_step"]
    row.peaks = {key: value for result in results for key, value in result["peaks"].items()}
    return row


def _ddp_worker(out: Path, steps: int) -> int:
    """One rank of the NCCL row: time the steps, record this rank's GPU's peak memory."""
    from torch.utils.data import DataLoader, TensorDataset

    from benchmarks.bench_dp import Net as MLP
    from benchmarks.common import fit_step_times
    from lightning_gpupar import DDPStrategy

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.randn(256 * 2 * (steps + 1), 256, generator=g),
        torch.randint(0, 10, (256 * 2 * (steps + 1),), generator=g),
    )
    strategy = DDPStrategy(timeout=120)
    times = fit_step_times(
        MLP(1024),
        DataLoader(data, batch_size=256),
        steps,
        accelerator="gpu",
        devices=[0, 1],
        strategy=strategy,
    )
    device = torch.device("cuda", strategy.local_rank)
    result = {
        "ms_per_step": statistics.median(times) * 1e3,
        "peaks": {str(device): torch.cuda.max_memory_allocated(device)},
    }
    (out / f"rank{strategy.global_rank}.json").write_text(json.dumps(result))
    return 0


def _reset_peaks() -> None:
    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def _peaks() -> dict[str, int]:
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}


# -- 3. the report -------------------------------------------------------------------------------------


def _report(count: int, tests_ok: bool, tests_text: str, rows: list[Row], seconds: float) -> str:
    from benchmarks.common import machine

    gpus = ", ".join(
        f"cuda:{i} {torch.cuda.get_device_name(i)} ({_gib(torch.cuda.get_device_properties(i).total_memory)})"
        for i in range(count)
    )
    ok = tests_ok and not any(r.error for r in rows)
    lines = [
        f"# gpu-check {datetime.date.today().isoformat()}: {'PASS' if ok else 'FAIL'}",
        "",
        f"machine: {machine()}",
        f"GPUs: {gpus}",
        f"took {seconds:.0f} s",
        "",
        f"## CUDA tests (`pytest -m cuda`): {'passed' if tests_ok else 'FAILED'}",
        "",
        "```",
        tests_text,
        "```",
        "",
        "## GPU benchmarks",
        "",
        "| variant | devices | ms/step | peak memory per GPU (MiB) |",
        "|---|---|---|---|",
    ]
    for row in rows:
        time_text = f"{row.ms_per_step:.2f}" if row.ms_per_step is not None else f"failed: {row.error}"
        peaks = ", ".join(f"{d} {b / MiB:.0f}" for d, b in row.peaks.items())
        lines.append(f"| {row.name} | {row.devices} | {time_text} | {peaks} |")
    medians = {r.name: r.ms_per_step for r in rows if r.ms_per_step is not None}
    ratios = [
        ("dp 1 GPU / Lightning single (target <= 1.03)", "dp, 1 GPU", "Lightning single device"),
        ("model_split GPU+CPU / unsplit", "model_split GPU+CPU, chunks=1", "unsplit TransformerNet"),
        ("model_split GPU+GPU / unsplit", "model_split GPU+GPU, chunks=1", "unsplit TransformerNet"),
        (
            "pipeline GPU+GPU chunks=4 / chunks=1",
            "pipeline GPU+GPU, chunks=4 (CUDA streams)",
            "model_split GPU+GPU, chunks=1",
        ),
        (
            "ddp NCCL step / Lightning single (half the batch per GPU)",
            "ddp (NCCL), 2 processes",
            "Lightning single device",
        ),
    ]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [
        f"| {name} | {medians[a] / medians[b]:.3f} |"
        for name, a, b in ratios
        if a in medians and b in medians
    ]
    if count < 2:
        lines += [
            "",
            "One GPU: the multi-GPU rows (dp on 2 GPUs, GPU+GPU split, pipeline across GPUs, NCCL) need two.",
        ]
    return "\n".join(lines) + "\n"


def _gib(n: int) -> str:
    return f"{n / 2**30:.0f} GiB"


def _write(report: str) -> list[Path]:
    name = f"gpu-check-{datetime.date.today().isoformat()}.md"
    targets = [RESULTS / name]
    if os.environ.get("OUT"):
        targets.append(Path(os.environ["OUT"]) / name)
    for path in targets:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(report)
    return targets


if __name__ == "__main__":
    raise SystemExit(main())
