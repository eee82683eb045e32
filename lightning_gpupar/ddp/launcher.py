"""Start the other DDP processes of this node, correctly inside Hydra single runs and sweeps.

How it works: docs/internals.md, section ``lightning_gpupar/ddp/launcher.py``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch.distributed
from lightning.fabric.plugins.environments import ClusterEnvironment, LightningEnvironment
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from lightning.pytorch.utilities.exceptions import SIGTERMException

from lightning_gpupar.ddp.rendezvous import check_rendezvous
from lightning_gpupar.devices.agreement import check_strategy_devices
from lightning_gpupar.devices.requests import AUTO_IDS_ENV, LAUNCHER_PID_ENV
from lightning_gpupar.errors import GpuparError

log = logging.getLogger(__name__)

#: Variables the launcher sets in its own process for the process group; restored when a new job starts.
DDP_ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", LAUNCHER_PID_ENV)
#: Set by Lightning in a rank's own environment after its CUDA numbering is fixed; restored between jobs.
CUDA_ORDER_ENV = "CUDA_DEVICE_ORDER"
#: Hydra overrides (keys, with their sub-keys) a child does not inherit: the sweep's own settings, and
#: the ones the launcher sets per child.
NOT_INHERITED = (
    "hydra.mode",
    "hydra.run",
    "hydra.sweep",
    "hydra.sweeper",
    "hydra.launcher",
    "hydra/sweeper",
    "hydra/launcher",
    "hydra.job.name",
    "hydra.output_subdir",
)
#: Command-line flags of a Hydra app that choose the primary config and must reach the child.
CONFIG_FLAGS = ("--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd")
#: Seconds a previous job's children get to exit before they are killed.
CHILD_EXIT_GRACE_S = 60.0
#: Seconds a failing rank 0 waits for a child to exit, so that it can name a child that failed first.
FAILURE_REPORT_GRACE_S = 5.0


class DDPLaunchError(GpuparError, RuntimeError):
    """The DDP processes cannot be started as configured; the message says what to change."""


@dataclass
class _Launch:
    """What one launch changed in this process, so the next Hydra job can undo it."""

    job_dir: str | None
    procs: list[subprocess.Popen] = field(default_factory=list)
    saved_env: dict[str, str | None] = field(default_factory=dict)


_previous_launch: _Launch | None = None


class HydraAwareScriptLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, with per-job child commands under Hydra and bounded failure.

    ``devices`` are the devices this node's processes train on; their GPU ids reach the children, so
    that ``strategy.device_ids=auto`` means in every rank what it meant in this one.
    """

    def __init__(
        self,
        cluster_environment: ClusterEnvironment,
        num_processes: int,
        num_nodes: int,
        devices: Sequence[torch.device] | None = None,
    ) -> None:
        super().__init__(cluster_environment, num_processes, num_nodes)
        self.devices = list(devices or [])
        self._signalled: list[subprocess.Popen] = []  # children taken out of the observer on a signal

    def launch(self, function: Callable, *args: Any, trainer: Any = None, **kwargs: Any) -> Any:
        """Check the process layout, start this node's other ranks, then run ``function`` here."""
        _retire_previous_job()
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None:  # a strategy given its own devices, and a Trainer asking for others
            check_strategy_devices(trainer, type(strategy).__name__, getattr(strategy, "node_devices", None))
        self._check_process_layout()
        env = self.cluster_environment
        timeout = getattr(strategy, "_timeout", None)
        check_rendezvous(
            env,
            self.num_nodes,
            env.node_rank() * self.num_processes + env.local_rank(),
            timeout.total_seconds() if timeout is not None else None,
        )
        check = getattr(getattr(trainer, "strategy", None), "check_before_launch", None)
        if check is not None:  # the strategy's own checks that need the model or loaders, before any child
            check(function, *args)
        try:
            return super().launch(function, *args, trainer=trainer, **kwargs)
        except BaseException as error:
            # Out of the process observer's sight first: on a child's non-zero exit it SIGKILLs this
            # process, which would cut short rank 0's own error and this report.
            self.stop_observing()
            children = list(self._signalled)
            if not isinstance(
                error, (KeyboardInterrupt, SIGTERMException)
            ):  # a signal, not a child, ended it
                _report_failed_children(children, self.cluster_environment.node_rank() * self.num_processes)
            _kill(children)
            raise

    def stop_observing(self) -> list[subprocess.Popen]:
        """Take the children out of Lightning's process observer (they are stopping on a signal, and a
        non-zero exit must not SIGKILL this process while it saves) and return them; rank 0 still reaps
        them when its own run ends."""
        children = list(self.procs)
        self.procs.clear()
        self._signalled.extend(children)
        return children

    def _check_process_layout(self) -> None:
        """Fail before any process group exists when the processes cannot match the devices."""
        env = self.cluster_environment
        expected = self.num_processes * self.num_nodes
        if not env.creates_processes_externally:
            return
        name = type(env).__name__
        if env.local_rank() >= self.num_processes:
            raise DDPLaunchError(
                f"This process has local rank {env.local_rank()} ({name}), but the strategy has "
                f"{self.num_processes} device(s) per node, so local ranks 0..{self.num_processes - 1} exist. "
                "More processes were started on this node than devices were chosen: start one process per "
                "device (torchrun --nproc_per_node, srun --ntasks-per-node) or choose more devices "
                "(strategy.device_ids)."
            )
        world_size = env.world_size()
        if not isinstance(env, LightningEnvironment) and world_size != expected:  # its size is ours
            raise DDPLaunchError(
                f"{name} reports {world_size} processes in total, but the strategy expects "
                f"{self.num_processes} device(s) per node x {self.num_nodes} node(s) = {expected}. "
                f"Start {self.num_processes} process(es) per node on {self.num_nodes} node(s), or set "
                "strategy.device_ids and trainer.num_nodes to match the launcher."
            )

    def _call_children_scripts(self) -> None:
        """Start local ranks 1..N-1 with the DDP variables set, as Lightning does, but per Hydra job."""
        global _previous_launch
        self._check_can_spawn_children()
        env = self.cluster_environment
        port = env.main_port
        if env.node_rank() == 0:
            _require_free_port(port)
        record = _Launch(job_dir=_hydra_job_dir())
        ddp_env = {
            "MASTER_ADDR": env.main_address,
            "MASTER_PORT": str(port),
            "NODE_RANK": str(env.node_rank()),
            "LOCAL_RANK": str(env.local_rank()),
            "WORLD_SIZE": str(self.num_processes * self.num_nodes),
            LAUNCHER_PID_ENV: str(os.getpid()),
        }
        # CUDA_DEVICE_ORDER too: Lightning's CUDAAccelerator.setup sets PCI_BUS_ID here after this process's
        # CUDA numbering is fixed; left in place, the next job's children would number GPUs by PCI bus while
        # this rank keeps the order it started with (mixed GPU models).
        record.saved_env = {key: os.environ.get(key) for key in (*ddp_env, CUDA_ORDER_ENV)}
        os.environ.update(ddp_env)
        _previous_launch = record

        command, cwd = child_command(sys.argv)
        self.procs = []
        for local_rank in range(1, self.num_processes):
            global_rank = env.node_rank() * self.num_processes + local_rank
            child_env = child_environment(os.environ, local_rank, self.devices)
            rank_command = [*command, *_hydra_rank_overrides(global_rank)]
            self.procs.append(subprocess.Popen(rank_command, env=child_env, cwd=cwd))
        record.procs = self.procs


def _report_failed_children(children: Sequence[subprocess.Popen], node_offset: int) -> None:
    """When rank 0 fails because another rank died first, say which rank to look at.

    Rank 0 usually fails on a closed connection while the failed rank is still exiting, so the children
    get up to ``FAILURE_REPORT_GRACE_S`` to exit; the wait ends as soon as one has exited non-zero or
    none is left running.
    """
    deadline = time.monotonic() + FAILURE_REPORT_GRACE_S
    while time.monotonic() < deadline:
        codes = [proc.poll() for proc in children]
        if any(codes) or None not in codes:  # one failed, or none is left running
            break
        time.sleep(0.05)
    for local_rank, proc in enumerate(children, start=1):
        code, rank = proc.poll(), node_offset + local_rank
        if code is not None and code < 0:  # killed by a signal: it printed no error of its own
            log.error(
                "Rank %d (pid %d) was killed by signal %s before rank 0 failed, so it printed no error: "
                "the cause is outside the run (the out-of-memory killer: see `dmesg`; a kill by a user or "
                "a scheduler).",
                rank,
                proc.pid,
                _signal_name(-code),
            )
        elif code:
            log.error(
                "Rank %d (pid %d) exited with code %d before rank 0 failed: its error, printed above "
                "with the prefix [rank%d], is the cause.",
                rank,
                proc.pid,
                code,
                rank,
            )


def _signal_name(number: int) -> str:
    """``SIGKILL (9)``, or the bare number for a signal this platform does not name."""
    try:
        return f"{signal.Signals(number).name} ({number})"
    except ValueError:
        return str(number)


def _kill(children: Sequence[subprocess.Popen]) -> None:
    """Kill ranks that are still running (they may be blocked in a collective) and reap them all."""
    for proc in children:
        if proc.poll() is None:
            proc.kill()
    for proc in children:
        proc.wait(timeout=CHILD_EXIT_GRACE_S)


def child_environment(
    environ: Mapping[str, str], local_rank: int, devices: Sequence[torch.device]
) -> dict[str, str]:
    """``environ`` for local rank ``local_rank``, with the GPU ids of ``devices`` (this node's chosen
    devices) in ``LIGHTNING_GPUPAR_AUTO_DEVICE_IDS``: the child's ``"auto"`` takes them instead of
    choosing again by free memory, which this rank's own GPU has already changed."""
    env = {**environ, "LOCAL_RANK": str(local_rank)}
    gpu_ids = [str(d.index) for d in devices if d.type == "cuda" and d.index is not None]
    if gpu_ids:
        env[AUTO_IDS_ENV] = ",".join(gpu_ids)
    else:
        env.pop(AUTO_IDS_ENV, None)
    return env


def child_command(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """The command (without per-rank overrides) that re-runs this program as another rank, and its cwd.

    Without Hydra it is ``argv`` again. Under Hydra it is the current job: the config flags from
    ``argv``, the job's hydra and task overrides minus the sweep-only ones, and this job's output dir.
    """
    program = _program(argv)
    if not _hydra_initialized():
        return [*program, *argv[1:]], None

    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import get_original_cwd

    hydra_cfg = HydraConfig.get()
    overrides = [*_job_overrides(hydra_cfg.overrides.hydra), *_job_overrides(hydra_cfg.overrides.task)]
    pinned = [
        "hydra.mode=RUN",
        f"hydra.run.dir={_quote(hydra_cfg.runtime.output_dir)}",
        "hydra.output_subdir=null",
    ]
    return [*program, *_config_flags(argv), *overrides, *pinned], get_original_cwd()


def _program(argv: Sequence[str]) -> list[str]:
    """``python /abs/script.py`` or ``python -m package.module``, as this process was started."""
    import __main__

    spec = getattr(__main__, "__spec__", None)
    if spec is not None:
        return [sys.executable, "-m", spec.name]
    script = argv[0]
    if _hydra_initialized():
        from hydra.utils import to_absolute_path

        return [sys.executable, to_absolute_path(script)]
    return [sys.executable, os.path.abspath(script)]


def _hydra_rank_overrides(global_rank: int) -> list[str]:
    """Name the child's Hydra job after its rank, so each rank logs to its own file."""
    if not _hydra_initialized():
        return []
    from hydra.core.hydra_config import HydraConfig

    return [f"hydra.job.name={HydraConfig.get().job.name}_rank{global_rank}"]


def _job_overrides(overrides: Sequence[str]) -> list[str]:
    """The overrides that shape one job: everything except the sweep's own settings."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(list(overrides))
    kept = []
    for override in parsed:
        key = override.get_key_element().lstrip("+~")
        if any(key == k or key.startswith((k + ".", k + "@")) for k in NOT_INHERITED):
            continue
        if override.input_line:
            kept.append(override.input_line)
    return kept


def _config_flags(argv: Sequence[str]) -> list[str]:
    """``--config-name x``, ``-cp dir``... from ``argv``: they choose the primary config, not overrides."""
    flags: list[str] = []
    args = list(argv[1:])
    for i, arg in enumerate(args):
        name = arg.split("=", 1)[0]
        if name not in CONFIG_FLAGS:
            continue
        flags.append(arg)
        if "=" not in arg and i + 1 < len(args):
            flags.append(args[i + 1])
    return flags


def _quote(value: str) -> str:
    """A Hydra override value that survives any path: single-quoted, ``'`` escaped, and backslashes doubled
    only where Hydra's grammar un-escapes them (before a quote or at the end)."""
    return "'" + re.sub(r"(\\+)(?='|$)", r"\1\1", value).replace("'", "\\'") + "'"


def _hydra_initialized() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
    except ImportError:  # hydra is optional for the strategy itself
        return False
    return HydraConfig.initialized()


def _hydra_job_dir() -> str | None:
    if not _hydra_initialized():
        return None
    from hydra.core.hydra_config import HydraConfig

    return str(HydraConfig.get().runtime.output_dir)


def _retire_previous_job() -> None:
    """When a new Hydra job trains in this process, undo what the previous job's launch left behind."""
    global _previous_launch
    previous = _previous_launch
    if previous is None or previous.job_dir is None or previous.job_dir == _hydra_job_dir():
        return
    procs = list(previous.procs)
    previous.procs.clear()  # out of the process observer's sight before any is killed (see launch)
    for proc in procs:
        try:
            proc.wait(timeout=CHILD_EXIT_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    for key, value in previous.saved_env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _previous_launch = None


def _require_free_port(port: int) -> None:
    """Rank 0 hosts the rendezvous on ``port``: fail now, in words, when something else holds it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store does
        try:
            sock.bind(("", port))
        except OSError as err:
            raise DDPLaunchError(
                f"MASTER_PORT={port} is already in use on this machine ({err.strerror}), so rank 0 cannot "
                "host the process group there. Unset MASTER_PORT to let Lightning pick a free port, or set "
                "it to a free one."
            ) from None
