"""The Lightning side of ``schedule="1f1b"`` (model_split and ddp_split): one training step as micro-batches.

The batch is split along dim 0 into ``chunks`` micro-batches; the LightningModule's ``training_step`` runs
once per micro-batch inside :meth:`~lightning_gpupar.model_split.one_f_one_b.StagedPipeline.run`, which
backpropagates each one in 1F1B order. Each micro-batch's loss is weighted by its share of the samples
(and ``1 / accumulate_grad_batches``, as Lightning scales it), so the accumulated gradients are those of
the full batch's mean loss, and the step returns that mean. ``self.log`` calls made inside the micro-batch
steps are held back and logged once per step: numbers as the sample-weighted mean over micro-batches,
metric objects (which accumulate their own updates) as the last call logged them; with ``reduce_fx`` sum,
max or min, numbers are combined by that reduction instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from torch import Tensor

from lightning_gpupar.dp.batch import split_batch
from lightning_gpupar.dp.replica_results import _LOG_SIGNATURE, _REDUCTIONS, _REDUCTIONS_BY_FN
from lightning_gpupar.model_split.errors import PipelineError
from lightning_gpupar.model_split.one_f_one_b import StagedPipeline


def check_one_f_one_b(module: pl.LightningModule) -> None:
    """Refuse, before training, what a per-micro-batch training step cannot honour."""
    if not module.automatic_optimization:
        raise PipelineError(
            "schedule='1f1b' runs the backward itself, micro-batch by micro-batch, inside Lightning's "
            "automatic optimization; this LightningModule uses manual optimization "
            "(automatic_optimization=False). Use schedule='gpipe', or automatic optimization."
        )
    if type(module).backward is not pl.LightningModule.backward:
        raise PipelineError(
            f"schedule='1f1b': {type(module).__name__} overrides LightningModule.backward, which 1F1B never "
            "calls (each micro-batch's backward runs stage by stage). Use schedule='gpipe', or remove the "
            "override."
        )


def one_f_one_b_step(
    module: pl.LightningModule,
    staged: StagedPipeline,
    chunks: int,
    step: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    loss_scale: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """Run ``step(micro_batch, *args[1:], **kwargs)`` per micro-batch in 1F1B order; return the mean loss.

    ``loss_scale``: applied to each weighted micro-batch loss before its backward (a ``GradScaler``)."""
    shards, sizes = split_batch(args[0], chunks)
    total = sum(sizes)
    trainer = module.trainer
    accumulate = trainer.accumulate_grad_batches if trainer is not None else 1
    losses: list[Tensor] = []
    logged = _HeldLogs(module)

    def forward(m: int) -> Tensor:
        with logged.micro_batch(sizes[m]):
            output = step(shards[m], *args[1:], **kwargs)
        loss = _loss_of(output, m)
        losses.append(loss.detach())
        weighted = loss * (sizes[m] / total / accumulate)
        return loss_scale(weighted) if loss_scale is not None else weighted

    staged.run(len(shards), forward)
    mean = torch.stack([loss * size for loss, size in zip(losses, sizes, strict=True)]).sum() / total
    logged.flush()
    return mean


def _loss_of(output: Any, m: int) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    extra = sorted(k for k in output if k != "loss") if isinstance(output, Mapping) else []
    if not isinstance(loss, Tensor) or extra:
        what = f"a dict with {extra}" if extra else type(output).__name__
        raise PipelineError(
            f"schedule='1f1b': training_step returned {what} for micro-batch {m}; 1F1B needs the loss "
            "tensor (or {'loss': tensor}) of every micro-batch, since it backpropagates each one as soon as "
            "it is computed, and it cannot skip a step or merge other outputs. Return the loss, or use "
            "schedule='gpipe'."
        )
    return loss


class _HeldLogs:
    """Hold back ``module.log`` calls made during micro-batch steps; :meth:`flush` logs each name once."""

    def __init__(self, module: pl.LightningModule) -> None:
        self.module = module
        self.calls: dict[str, list[tuple[Any, int, tuple[Any, ...], dict[str, Any]]]] = {}
        self._size = 0

    def micro_batch(self, size: int) -> _HeldLogs:
        self._size = size
        return self

    def __enter__(self) -> None:
        def log(name: str, value: Any, *args: Any, **kwargs: Any) -> None:
            if isinstance(value, Tensor):
                value = value.detach()
            self.calls.setdefault(name, []).append((value, self._size, args, kwargs))

        self.module.__dict__["log"] = log

    def __exit__(self, *_: Any) -> None:
        self.module.__dict__.pop("log", None)

    def flush(self) -> None:
        for name, calls in self.calls.items():
            value, _, args, kwargs = calls[-1]
            numbers = [c[0] for c in calls if isinstance(c[0], Tensor | int | float)]
            if len(numbers) == len(calls):
                reduce_fx = _LOG_SIGNATURE.bind(None, name, value, *args, **kwargs).arguments.get("reduce_fx")
                reduction = _REDUCTIONS.get(reduce_fx) if isinstance(reduce_fx, str) else None
                reduction = reduction or _REDUCTIONS_BY_FN.get(reduce_fx, "mean")  # type: ignore[arg-type]
                if reduction == "mean":
                    total = sum(c[1] for c in calls)
                    value = sum(c[0] * c[1] for c in calls) / total
                else:  # the whole batch's sum / max / min from its micro-batches'
                    stacked = torch.stack([torch.as_tensor(c[0]).reshape(()) for c in calls])
                    value = getattr(stacked, reduction)()
                if all(isinstance(c[3].get("batch_size"), int) for c in calls):
                    kwargs = {**kwargs, "batch_size": sum(c[3]["batch_size"] for c in calls)}
            pl.LightningModule.log(self.module, name, value, *args, **kwargs)
        self.calls = {}


def all_reduce_gradients(module: torch.nn.Module) -> None:
    """Average the gradients over the default process group, as DDP's reducer would (one flat tensor per
    device and dtype). A parameter without a gradient here contributes zeros."""
    world = dist.get_world_size()
    groups: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
    for param in module.parameters():
        if not param.requires_grad:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        groups.setdefault((param.grad.device, param.grad.dtype), []).append(param.grad)
    for grads in groups.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat.div_(world)
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))
