"""Launch variables checked before the rendezvous, so that a wrong one fails in seconds, by name.

How it works: docs/internals.md, section ``lightning_gpupar/ddp/rendezvous.py``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import threading
import time

from lightning.fabric.plugins.environments import (
    ClusterEnvironment,
    LightningEnvironment,
    SLURMEnvironment,
    TorchElasticEnvironment,
)

from lightning_gpupar.ddp.checks import DDPConfigError

log = logging.getLogger(__name__)

#: Seconds a rank other than 0 tries to reach ``MASTER_ADDR:MASTER_PORT`` before it fails (never more
#: than ``strategy.timeout``); ``LIGHTNING_GPUPAR_CONNECT_TIMEOUT`` sets another bound.
CONNECT_BOUND_S = 15.0
CONNECT_BOUND_ENV = "LIGHTNING_GPUPAR_CONNECT_TIMEOUT"
#: Seconds between two tries to connect.
RETRY_EVERY_S = 0.5
#: errno values of a connection attempt that mean "no answer from that machine" (as a time-out does).
_NO_ANSWER = {errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EHOSTDOWN, errno.ENETDOWN, errno.ETIMEDOUT}


def check_rendezvous(
    env: ClusterEnvironment, num_nodes: int, global_rank: int, timeout_s: float | None
) -> None:
    """Check the node rank, then that ``MASTER_ADDR`` resolves and, from a rank other than 0, answers."""
    check_node_rank(env, num_nodes)
    bound = connect_bound(timeout_s)
    address, port = env.main_address, env.main_port
    resolve_master(address, bound)
    if global_rank != 0:
        reach_master(address, port, bound, global_rank)


def check_node_rank(env: ClusterEnvironment, num_nodes: int) -> None:
    """A node rank in ``0..num_nodes-1``: beyond it, no process would be rank 0 and every rank would wait."""
    node_rank = env.node_rank()
    if 0 <= node_rank < num_nodes:
        return
    variable = _node_rank_variable(env)
    raise DDPConfigError(
        f"{variable}={node_rank} ({type(env).__name__}), but trainer.num_nodes={num_nodes}: node ranks "
        f"0..{num_nodes - 1} exist, so this run would wait strategy.timeout at the rendezvous for a rank 0 "
        f"that never starts. On one machine, unset {variable} (left in the shell from another job?); on "
        f"several, set trainer.num_nodes to the number of nodes and {variable} to this node's rank "
        "(0 on the node at MASTER_ADDR)."
    )


def connect_bound(timeout_s: float | None) -> float:
    """:data:`CONNECT_BOUND_S` (or the environment's bound), at most ``timeout_s``."""
    raw = os.environ.get(CONNECT_BOUND_ENV)
    try:
        bound = float(raw) if raw is not None else CONNECT_BOUND_S
    except ValueError:
        bound = -1.0
    if not 0 < bound < float("inf"):
        raise DDPConfigError(
            f"{CONNECT_BOUND_ENV}={raw!r} is not a number of seconds > 0: it bounds how long a rank tries to "
            f"reach MASTER_ADDR. Unset it for {CONNECT_BOUND_S:g} s, or write e.g. {CONNECT_BOUND_ENV}=60."
        )
    return min(bound, timeout_s) if timeout_s else bound


def resolve_master(address: str, bound: float) -> None:
    """``MASTER_ADDR`` resolves to an address within ``bound`` seconds, or this fails naming it."""
    found: list[BaseException | None] = []

    def resolve() -> None:
        try:
            socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
            found.append(None)
        except OSError as err:
            found.append(err)

    worker = threading.Thread(target=resolve, name="resolve MASTER_ADDR", daemon=True)
    worker.start()
    worker.join(bound)  # the resolver cannot be cancelled: a slow one is left behind, daemonic
    if found and found[0] is None:
        return
    why = f"{found[0]}" if found else f"no answer from the resolver within {bound:g} s"
    raise DDPConfigError(
        f"MASTER_ADDR={address!r} does not resolve to an address ({why}). Every rank reaches the rendezvous "
        "there, on the machine of rank 0. Set MASTER_ADDR to the host name or IP address of the node where "
        "rank 0 (node rank 0) runs, or unset it when every process runs on this machine (127.0.0.1)."
    )


def reach_master(address: str, port: int, bound: float, global_rank: int) -> None:
    """From a rank other than 0: ``MASTER_ADDR:MASTER_PORT`` answers within ``bound`` seconds.

    A connection accepted (rank 0 or torchrun's agent listens) or refused (the machine answers, nothing
    listens there yet: rank 0 may start later) is an answer; only silence (a time-out, no route to the
    machine) for the whole bound fails.
    """
    deadline = time.monotonic() + bound
    last: OSError | None = None
    while (left := deadline - time.monotonic()) > 0:
        try:
            with socket.create_connection((address, port), timeout=left):
                return
        except ConnectionRefusedError:
            log.info(
                "Rank %d: MASTER_ADDR=%s answers, but nothing listens on MASTER_PORT=%d yet; waiting for "
                "rank 0 up to strategy.timeout.",
                global_rank,
                address,
                port,
            )
            return
        except OSError as err:  # a time-out, or no route to that machine; anything else is an answer
            if not isinstance(err, TimeoutError) and err.errno not in _NO_ANSWER:
                return
            last = err
        time.sleep(min(RETRY_EVERY_S, max(deadline - time.monotonic(), 0)))
    said = f": {last.strerror or last}" if last is not None and not isinstance(last, TimeoutError) else ""
    raise DDPConfigError(
        f"MASTER_ADDR={address!r} gave no answer on MASTER_PORT={port} within {bound:g} s{said}. Rank "
        f"{global_rank} connects there to the rendezvous that rank 0 hosts, and would have waited "
        "strategy.timeout. Set MASTER_ADDR to the address of the node where rank 0 runs, as this node "
        f"reaches it, and check that a firewall lets port {port} through; {CONNECT_BOUND_ENV}=<seconds> "
        "allows longer."
    )


def _node_rank_variable(env: ClusterEnvironment) -> str:
    """The launch variable ``env`` read the node rank from."""
    if isinstance(env, TorchElasticEnvironment):
        return "GROUP_RANK"
    if isinstance(env, SLURMEnvironment):
        return "SLURM_NODEID"
    if isinstance(env, LightningEnvironment):
        return "NODE_RANK" if "NODE_RANK" in os.environ or "GROUP_RANK" not in os.environ else "GROUP_RANK"
    return "the node rank"
