"""Checks of DDP's options and of the launch variables in the environment, when the strategy is built.

Without them, a bad value fails deep inside torch or Lightning (``MASTER_PORT=99999`` as an
``OverflowError``, an unknown backend as ``AssertionError: Unknown backend type``, ``timeout=-1`` as a
socket time-out of -1000 ms), or is ignored (``WORLD_SIZE=junk``).
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch.distributed

from lightning_gpupar.errors import GpuparError

#: Launch variables that hold a count or a rank, and the smallest valid value.
_INT_VARIABLES = {
    "WORLD_SIZE": 1,
    "RANK": 0,
    "LOCAL_RANK": 0,
    "NODE_RANK": 0,
    "GROUP_RANK": 0,
    "LOCAL_WORLD_SIZE": 1,
}


class DDPConfigError(GpuparError, ValueError):
    """A DDP option or launch variable that cannot work; the message says what to write instead."""


#: The range ``strategy.timeout`` may take, in seconds: 1 s to a day. Below, a rendezvous cannot finish
#: (torch fails with "client socket has timed out after 1ms"); beyond, a hung collective holds the GPUs for
#: days, and ``inf`` overflows ``timedelta``.
TIMEOUT_RANGE_S = (1.0, 86400.0)


def check_timeout(timeout: float | timedelta | None) -> timedelta | None:
    """``timeout`` (seconds or a ``timedelta``) as a ``timedelta`` within :data:`TIMEOUT_RANGE_S`;
    ``None`` (torch's default) stays ``None``."""
    if timeout is None:
        return None
    low, high = TIMEOUT_RANGE_S
    seconds = timeout.total_seconds() if isinstance(timeout, timedelta) else timeout
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not low <= seconds <= high:
        raise DDPConfigError(
            f"timeout={seconds!r} (strategy.timeout) is not a number of seconds from {low:g} to {high:g} "
            "(a day): it is how long the rendezvous and each collective may wait before every rank fails. "
            "Write e.g. strategy.timeout=1800 (torch's default, 30 minutes)."
        )
    return timedelta(seconds=seconds)


def check_backend(backend: str | None) -> None:
    """A ``process_group_backend`` torch knows (``gloo``, ``nccl``, ``mpi``, ``ucc``... or
    ``cpu:gloo,cuda:nccl``) and that this torch build has."""
    if backend is None:
        return
    known = [b for b in torch.distributed.Backend.backend_list if b not in ("undefined", "fake")]
    for part in str(backend).split(","):
        name = part.split(":")[-1].strip().lower()
        if name not in known:
            raise DDPConfigError(
                f"process_group_backend={backend!r} (strategy.process_group_backend): {name!r} is not a "
                f"torch.distributed backend. Valid: {', '.join(known)}, or a device map such as "
                "'cpu:gloo,cuda:nccl'; null picks nccl on GPUs and gloo on the CPU."
            )
        available = getattr(torch.distributed, f"is_{name}_available", lambda: True)()
        if not available:
            raise DDPConfigError(
                f"process_group_backend={backend!r} (strategy.process_group_backend): this torch build "
                f"({torch.__version__}) has no {name}. Use gloo on the CPU, nccl on NVIDIA GPUs, or null "
                "to let the device choose."
            )


def check_launch_environment() -> None:
    """``MASTER_PORT`` and the rank and size variables, where set, hold values a launch can use."""
    port = os.environ.get("MASTER_PORT")
    if port is not None and not (port.strip().isdigit() and 1 <= int(port) <= 65535):
        raise DDPConfigError(
            f"MASTER_PORT={port!r} is not a TCP port: valid are 1..65535. Set a free port "
            "(e.g. MASTER_PORT=29500), or unset MASTER_PORT to let Lightning pick a free one."
        )
    for name, low in _INT_VARIABLES.items():
        value = os.environ.get(name)
        if value is not None and not (value.strip().isdigit() and int(value) >= low):
            raise DDPConfigError(
                f"{name}={value!r} in the environment is not valid: it must be an int >= {low}. Launchers "
                f"(torchrun, SLURM, Lightning) set it for the processes they start: unset {name} when you "
                "start the run yourself, or fix the value."
            )
