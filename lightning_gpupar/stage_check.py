"""Check, once, that a module's forward really is the chain of the stages a pipeline will run instead.

A pipeline replaces the owner's ``forward`` with ``stage_n(... stage_1(input))``. For an
``nn.Sequential`` that is its definition; for any other owner (``embed -> blocks -> head`` in a loop)
it is the user's promise. :func:`check_stage_chain` runs the original forward once on a sample, with
hooks on the stages, and refuses a forward that calls them in another order, transforms a value between
them (``b(relu(a(x)))`` with ``relu`` outside the stages), or returns something else: pipelining those
would silently compute a different model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from lightning_gpupar.placement import PlacementError


def check_stage_chain(
    owner_name: str,
    forward: Callable[..., Any],
    stages: Sequence[tuple[str, nn.Module]],
    args: Any,
    kwargs: Any,
) -> None:
    """Run ``forward(*args, **kwargs)`` (no grad, RNG state kept) and verify it chains ``stages`` in order."""
    calls: list[tuple[int, Any, Any]] = []  # (stage index, first input, output)
    handles = []
    for index, (_, module) in enumerate(stages):
        handles.append(
            module.register_forward_hook(
                lambda m, a, out, i=index: calls.append((i, a[0] if a else None, out)), prepend=True
            )
        )
    try:
        gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=gpus):
            result = forward(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    names = [name for name, _ in stages]
    order = [names[i] for i, _, _ in calls]
    problem = None
    if order != names:
        problem = f"its forward calls {order}"
    elif not (len(args) == 1 and not kwargs and calls[0][1] is args[0]):
        problem = f"the first stage {names[0]} does not receive the forward's one input unchanged"
    else:
        for (i, given, _), (_, _, previous) in zip(calls[1:], calls[:-1], strict=True):
            if given is not previous:
                problem = f"{names[i]} does not receive {names[i - 1]}'s output unchanged"
                break
        else:
            if result is not calls[-1][2]:
                problem = f"the forward does not return {names[-1]}'s output unchanged"
    if problem is not None:
        raise PlacementError(
            f"chunks > 1 would run {owner_name} as the chain {' -> '.join(names)}, but {problem}. "
            "Pipelining it would compute a different model. Declare the stages in the order the forward "
            "calls them (strategy.stages=[...]), move the computation between stages into a stage, or use "
            "chunks=1."
        )
