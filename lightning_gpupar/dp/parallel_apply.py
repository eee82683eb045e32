"""Run one callable per device in threads, carrying the caller's thread-local torch state into each.

Grad mode, inference mode and autocast are per thread: a replica running in a worker thread would
silently lose ``torch.no_grad()`` or mixed precision. Each worker re-enters the caller's state (and, on
CUDA, makes its device current). One callable runs inline, without a thread.

A ``StopIteration`` escaping a callable is re-raised as :class:`ReplicaStopIterationError` (as PEP 479 does
for generators): Lightning's loops would otherwise read it as "no more data" and end the epoch silently.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

from lightning_gpupar.errors import GpuparError


class ReplicaStopIterationError(GpuparError, RuntimeError):
    """A ``StopIteration`` (or ``StopAsyncIteration``) escaped user code run by a replica, a pipeline stage
    or a hook we call; chained to it. Lightning's loops would read it as "no more data" (PEP 479 wraps it the
    same way for generators)."""


class StopIterationAsError:
    """Re-raise a ``StopIteration`` / ``StopAsyncIteration`` from the block as
    :class:`ReplicaStopIterationError` naming ``where`` (e.g. ``"data-parallel replica 1 on cuda:1"``)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: object) -> None:
        if isinstance(error, StopIteration | StopAsyncIteration):
            raise ReplicaStopIterationError(
                f"{type(error).__name__} raised in {self.where}. Lightning would read it as the end of the "
                "data and end the epoch silently, so it is raised as this error instead: find the next() "
                "or iterator that ran out in the traceback above (e.g. next(self.parameters()) on a module "
                "without parameters)."
            ) from error


def run_parallel(fns: Sequence[Callable[[], Any]], devices: Sequence[torch.device]) -> list[Any]:
    """``[fn() for fn in fns]``, each in its own thread with the caller's torch state, on its device."""
    enter_state = _capture_state()
    # The caller's current stream on each device, taken here as torch's parallel_apply does: in a new
    # thread the current stream is the default one, and shards the caller wrote on its stream would be
    # read there without a wait.
    streams = [torch.cuda.current_stream(d) if d.type == "cuda" else None for d in devices]
    if len(fns) == 1:
        with StopIterationAsError(_replica(0, devices[0])), on_device(devices[0], streams[0]):
            return [fns[0]()]

    results: list[Any] = [None] * len(fns)
    errors: list[BaseException | None] = [None] * len(fns)

    def work(i: int) -> None:
        try:
            device = devices[i]
            with StopIterationAsError(_replica(i, device)), enter_state(), on_device(device, streams[i]):
                results[i] = fns[i]()
        except BaseException as error:  # re-raised in the caller's thread below
            errors[i] = error

    threads = [threading.Thread(target=work, args=(i,), name=f"gpupar-replica-{i}") for i in range(len(fns))]
    with _sigint_deferred():  # Ctrl-C while replicas run is raised once they have all ended
        for thread in threads:
            thread.start()
        _join_all(threads)
    for i, error in enumerate(errors):
        if error is not None:
            if hasattr(error, "add_note"):  # Python >= 3.11
                error.add_note(f"(raised in data-parallel replica {i} on {devices[i]})")
            raise error
    return results


def _replica(index: int, device: torch.device) -> str:
    return f"data-parallel replica {index} on {device}"


@contextmanager
def _sigint_deferred() -> Iterator[None]:
    """Hold back Python's Ctrl-C (``KeyboardInterrupt``) until the block ends, then raise it.

    Unwinding the main thread while replica threads still run torch ops (Lightning's graceful shutdown,
    then interpreter exit) could abort the process with ``terminate called without an active exception``.
    Only Python's default SIGINT handler is deferred, and only in the main thread (where handlers run).
    """
    if threading.current_thread() is not threading.main_thread() or (
        signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    received: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


def _join_all(threads: Sequence[threading.Thread]) -> None:
    """Wait for every thread, also when a signal handler's exception arrives during the wait: it is
    re-raised once all replicas have finished their step."""
    pending: BaseException | None = None
    for thread in threads:
        while thread.is_alive():
            try:
                thread.join()
            except BaseException as error:  # a signal handler's exception; keep the first
                pending = pending or error
    if pending is not None:
        raise pending


def _capture_state() -> Callable[[], ExitStack]:
    """A context factory that re-enters the calling thread's grad, inference and autocast modes."""
    grad = torch.is_grad_enabled()
    inference = torch.is_inference_mode_enabled()
    autocast = {
        kind: torch.get_autocast_dtype(kind) for kind in ("cpu", "cuda") if torch.is_autocast_enabled(kind)
    }
    cache = torch.is_autocast_cache_enabled()

    def enter() -> ExitStack:
        stack = ExitStack()
        stack.enter_context(torch.inference_mode(inference))
        stack.enter_context(torch.set_grad_enabled(grad))
        for kind, dtype in autocast.items():
            stack.enter_context(torch.autocast(kind, dtype=dtype, cache_enabled=cache))
        return stack

    return enter


@contextmanager
def on_device(device: torch.device, stream: torch.cuda.Stream | None = None) -> Iterator[None]:
    """``device`` current (CUDA), and ``stream`` (a stream the caller captured) current on it."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.device(device):
        if stream is None:
            yield
            return
        with torch.cuda.stream(stream):
            yield
