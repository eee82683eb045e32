"""Check, once, that a module's forward really is the chain of the stages a pipeline will run instead.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/chain_check.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_gpupar.model_split.errors import PipelineError


def check_stage_chain(
    owner_name: str,
    forward: Callable[..., Any],
    stages: Sequence[tuple[str, nn.Module]],
    args: Any,
    kwargs: Any,
) -> None:
    """Run ``forward(*args, **kwargs)`` without side effects and verify it chains ``stages`` in order."""
    inputs: list[tuple[int, Any]] = []  # (stage index, first positional input) per call
    outputs: list[Any] = []
    handles = []
    for index, (_, module) in enumerate(stages):
        handles += [
            module.register_forward_pre_hook(
                lambda m, a, i=index: inputs.append((i, a[0] if a else None)), prepend=True
            ),
            module.register_forward_hook(lambda m, a, out: outputs.append(out)),
        ]
    try:
        gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.no_grad(), torch.random.fork_rng(devices=gpus), _buffers_kept([m for _, m in stages]):
            result = forward(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()

    names = [name for name, _ in stages]
    order = [names[i] for i, _ in inputs]
    problem = None
    if order != names:
        problem = f"its forward calls {order}"
    elif not (len(args) == 1 and not kwargs and inputs[0][1] is args[0]):
        problem = f"the first stage {names[0]} does not receive the forward's one input unchanged"
    else:
        for (i, given), previous in zip(inputs[1:], outputs[:-1], strict=True):
            if given is not previous:
                problem = f"{names[i]} does not receive {names[i - 1]}'s output unchanged"
                break
        else:
            if result is not outputs[-1]:
                problem = f"the forward does not return {names[-1]}'s output unchanged"
    if problem is not None:
        raise PipelineError(
            f"chunks > 1 would run {owner_name} as the chain {' -> '.join(names)}, but {problem}. "
            "Pipelining it would compute a different model. Declare the stages in the order the forward "
            "calls them (strategy.stages=[...]), move the computation between stages into a stage, or use "
            "chunks=1."
        )


@contextlib.contextmanager
def _buffers_kept(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Give every buffer of ``modules`` its value (and tensor object) back on exit."""
    saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    for module in modules:
        for owner in module.modules():
            for name, buffer in owner._buffers.items():
                if buffer is not None:
                    saved.append((owner, name, buffer, buffer.clone()))
    try:
        yield
    finally:
        with torch.no_grad():
            for owner, name, buffer, value in saved:
                owner._buffers[name] = buffer
                buffer.copy_(value)
