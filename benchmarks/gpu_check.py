"""``make gpu-check``: prove a GPU machine in one command, in under 8 minutes (``--quick``: under 4).

    python benchmarks/gpu_check.py [--quick] [--steps 30] [--pytest-timeout 300]
    make gpu-check PY=python3          # the same, with that interpreter; neither installs anything

It first checks that the packages it needs import. For a missing one it prints the commands that make a
small wheelhouse on a connected machine and the line that installs it here without an index; without the
optional ones (Hydra: hydra-core, omegaconf, antlr4-python3-runtime) it goes on and their tests skip. Then,
on whatever GPUs the machine has (one is enough; two or more unlock the multi-GPU cases):

1. the CUDA tests (``pytest -m cuda``; ``--quick``: ``-m "cuda and not slow"``), killed with every process
   they started (DDP ranks in sessions of their own too) when they run past their time;
2. the GPU rows of every benchmark: dp on one GPU against Lightning's single device (and on two GPUs),
   model_split CPU+GPU and GPU+GPU, the pipeline with CUDA streams (``chunks=4``), DDP with NCCL;
3. the peak memory of each GPU under each of them (``torch.cuda.max_memory_allocated``).

It writes one Markdown report naming torch, CUDA, the driver and the GPUs to
``benchmarks/results/gpu-check-<date>.md`` (and into ``$OUT`` when that is set) and exits non-zero when a
test or a benchmark failed. Without a GPU it says so and exits with status 2: there is nothing to prove.
Without a required package (torch, lightning, pytest, torchmetrics) it exits with status 3.
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

from benchmarks import offline  # noqa: E402  (imports nothing beyond the standard library)
from benchmarks.process_tree import run_bounded  # noqa: E402

NO_GPU_EXIT = 2
MISSING_PACKAGE_EXIT = 3
#: Seconds the whole check may take, and what the CUDA tests get of it: full, then --quick.
BUDGET_S = {False: 480.0, True: 240.0}
PYTEST_TIMEOUT_S = {False: 300.0, True: 150.0}
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
    parser.add_argument("--quick", action="store_true", help="at most 4 minutes: no slow tests, fewer steps")
    parser.add_argument("--steps", type=int, help="training steps per benchmark variant (30; --quick: 10)")
    parser.add_argument("--pytest-timeout", type=float, help="seconds for the CUDA tests (300; --quick: 150)")
    parser.add_argument("--ddp-worker", metavar="DIR", help=argparse.SUPPRESS)  # a rank of the NCCL row
    args = parser.parse_args(argv)
    steps = args.steps or (10 if args.quick else 30)
    if args.ddp_worker:
        return _ddp_worker(Path(args.ddp_worker), steps)

    started = time.monotonic()
    missing = offline.missing_packages()
    if missing:
        print(f"gpu-check: some packages do not import with {sys.executable}:")
        print(offline.describe(missing))
        print(offline.wheelhouse_instructions(missing))
    if any(m.module == "torch" for m in missing):
        print("gpu-check: torch does not import, so no GPU can be looked for. Nothing was installed.")
        return MISSING_PACKAGE_EXIT
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        print(
            f"gpu-check: found no CUDA GPU (torch {torch.__version__}, CUDA build: "
            f"{'yes' if torch.version.cuda else 'no'}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}), so there is nothing to check. Run "
            "`make gpu-check` on a machine with at least one GPU. Nothing was installed."
        )
        return NO_GPU_EXIT
    if any(m.required for m in missing):
        print("gpu-check: a required package is missing (above); nothing was run or installed.")
        return MISSING_PACKAGE_EXIT

    budget = BUDGET_S[args.quick]
    timeout = args.pytest_timeout or PYTEST_TIMEOUT_S[args.quick]
    tests_ok, tests_text = _cuda_tests(timeout, args.quick)
    rows = _benchmarks(count, steps, deadline=started + budget - 20, quick=args.quick)
    report = _report(count, tests_ok, tests_text, rows, time.monotonic() - started, missing, args.quick)
    for path in _write(report):
        print(f"gpu-check: report written to {path}")
    print(report)
    return 0 if tests_ok and not any(r.error for r in rows) else 1


# -- 1. the CUDA tests ---------------------------------------------------------------------------------


def _cuda_tests(timeout: float, quick: bool) -> tuple[bool, str]:
    """Run ``pytest -m cuda``; whether it passed, and its summary, slowest tests and failures."""
    marker = "cuda and not slow" if quick else "cuda"
    command = [sys.executable, "-m", "pytest", "-m", marker, "-q", "-rfEs", "--durations=15"]
    command += ["-p", "no:cacheprovider", "tests"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = run_bounded(command, timeout, cwd=ROOT, env=env)
    lines = done.stdout.strip().splitlines()
    if done.timed_out:  # pytest and every process it started (DDP ranks too) were killed
        text = f"pytest -m {marker!r} did not finish within {timeout:.0f} s (killed, with its processes)."
        return False, "\n".join([text, *lines[-40:]])
    keep = [line for line in lines if line.startswith(("FAILED", "ERROR", "SKIPPED"))]
    durations = _durations(lines)
    summary = lines[-1] if lines else done.stderr.strip()[-500:]
    return done.returncode == 0, "\n".join([f"pytest -m {marker!r}: {summary}", *keep, *durations])


def _durations(lines: list[str]) -> list[str]:
    """pytest's ``--durations`` table (the slowest tests), so the next budget is set from facts."""
    try:
        start = next(i for i, line in enumerate(lines) if "slowest" in line and "durations" in line)
    except StopIteration:
        return []
    return [line for line in lines[start : start + 17] if line.strip()]


# -- 2. the GPU benchmark rows -------------------------------------------------------------------------


def _benchmarks(count: int, steps: int, deadline: float, quick: bool) -> list[Row]:
    import torch
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
    if quick:  # the rows the ratios need on one GPU
        keep = {"Lightning single device", "dp, 1 GPU", "unsplit TransformerNet"}
        variants = [v for v in variants if v[0] in keep or v[1].count("cuda:1")]
    rows = []
    for name, devices, make, loader, kwargs in variants:
        if time.monotonic() > deadline:
            rows.append(Row(name, devices, error="not run: the check's time budget was spent"))
            continue
        rows.append(_measure(name, devices, make, loader, steps, **kwargs))
    if gpu1 is not None:
        rows.append(_ddp_nccl(steps) if time.monotonic() < deadline else Row("ddp (NCCL)", "cuda:0, cuda:1"))
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
        done = run_bounded(command, 180, cwd=ROOT, env=env)  # on timeout, rank 1 is killed too
        try:
            results = [json.loads((Path(out) / f"rank{r}.json").read_text()) for r in (0, 1)]
        except Exception:
            row.error = traceback.format_exc(limit=1).strip().splitlines()[-1]
            row.error += " | " + done.stderr.strip()[-300:].replace("\n", " ")
            return row
    row.ms_per_step = results[0]["ms_per_step"]
    row.peaks = {key: value for result in results for key, value in result["peaks"].items()}
    return row


def _ddp_worker(out: Path, steps: int) -> int:
    """One rank of the NCCL row: time the steps, record this rank's GPU's peak memory."""
    import torch
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
    import torch

    for i in range(torch.cuda.device_count()):
        torch.cuda.reset_peak_memory_stats(i)


def _peaks() -> dict[str, int]:
    import torch

    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())}


# -- 3. the report -------------------------------------------------------------------------------------


def _report(
    count: int,
    tests_ok: bool,
    tests_text: str,
    rows: list[Row],
    seconds: float,
    missing: list[offline.Missing],
    quick: bool,
) -> str:
    import torch

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
        f"torch {torch.__version__}, CUDA {torch.version.cuda}, driver {_driver_version()}",
        f"GPUs: {gpus}",
        f"took {seconds:.0f} s{' (--quick)' if quick else ''}",
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
    if missing:
        described = offline.describe(missing)
        lines += ["", "Missing packages (their tests were skipped):", "", "```", described, "```"]
    if count < 2:
        lines += [
            "",
            "One GPU: the multi-GPU rows (dp on 2 GPUs, GPU+GPU split, pipeline across GPUs, NCCL) need two.",
        ]
    return "\n".join(lines) + "\n"


def _driver_version() -> str:
    """The NVIDIA driver's version: NVML, else nvidia-smi, else "unknown"."""
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        pass
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        first = done.stdout.strip().splitlines()[:1] if done.returncode == 0 else []
        return first[0] if first else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
