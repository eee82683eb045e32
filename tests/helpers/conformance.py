"""Float64 equivalence of whole networks under our strategies: one :class:`Case` = a network, a batch, a loss.

``fit(case, **trainer_kwargs)`` trains the case's network wrapped in :class:`CaseModule` for a few SGD
steps on fixed batches and returns each step's loss and gradients, so a test compares a strategy with
single-device training (``reference(case)``) at float64 precision.

Where a forward depends on the samples it is called with as a group (BatchNorm's batch statistics) or
updates state per call (spectral norm's power iteration), splitting a batch changes the result, as it
does under ``nn.DataParallel`` and GPipe. ``reference(case, shards=k)`` is then the comparable
single-device run: the same ``k`` shards, one after another, the loss their size-weighted mean.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import lightning_gpupar  # noqa: F401  (registers our strategy names)
from tests.helpers.trainer import TRAINING_ONLY

Batch = dict[str, Tensor]


@dataclass(frozen=True, eq=False)  # hashed by identity: reference() caches per case
class Case:
    """A network to train: ``build()`` it (seeded by the caller), feed ``batch(n, generator)``, take ``loss``.

    ``loss(model, batch)`` must be a mean over samples (each sample weighing the same), so the
    size-weighted mean over shards is the full-batch value. ``placement`` is an explicit
    ``model_split`` map over two devices (paths of :class:`CaseModule`, i.e. starting ``model.``);
    ``chain`` says its keys are an ``nn.Sequential``'s consecutive stages, so ``chunks=2`` pipelines them.
    ``sharded_under`` names the strategies ("dp", "pipeline") under which the comparable reference
    runs the same shards one after another (see the module docstring).
    """

    name: str
    build: Callable[[], nn.Module]
    batch: Callable[[int, torch.Generator], Batch]
    loss: Callable[[nn.Module, Batch], Tensor]
    placement: Mapping[str, int] = field(default_factory=dict)
    chain: bool = False
    sharded_under: frozenset[str] = field(default_factory=frozenset)
    slow: bool = False  #: its tests are marked slow (larger models: the fast suite stays fast)

    def __str__(self) -> str:
        return self.name


class CaseModule(pl.LightningModule):
    """A case's network in float64 with SGD; records each step's loss and gradients.

    With ``shards=k`` a step computes the loss of ``k`` consecutive shards one after another (the
    single-device equivalent of splitting the batch, see the module docstring).
    """

    def __init__(self, case: Case, shards: int = 1, lr: float = 0.1) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.case = case
        self.model = case.build().double()
        self.shards = shards
        self.lr = lr
        self.losses: list[Tensor] = []
        self.grads: list[dict[str, Tensor]] = []

    def training_step(self, batch: Batch, batch_idx: int) -> Tensor:
        if self.shards == 1:
            return self.case.loss(self.model, batch)
        pieces = {key: value.tensor_split(self.shards) for key, value in batch.items()}
        shards = [{key: pieces[key][i] for key in batch} for i in range(self.shards)]
        sizes = [len(next(iter(shard.values()))) for shard in shards]
        losses = [size * self.case.loss(self.model, shard) for size, shard in zip(sizes, shards, strict=True)]
        return torch.stack(losses).sum() / sum(sizes)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(outputs["loss"].detach().cpu().clone())

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        self.grads.append(
            {k: p.grad.detach().cpu().clone() for k, p in self.named_parameters() if p.grad is not None}
        )

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def batches(case: Case, n: int = 7, steps: int = 2) -> list[Batch]:
    """``steps`` fixed batches of ``n`` samples (7: uneven over 2 and 3 devices)."""
    return [case.batch(n, torch.Generator().manual_seed(100 + i)) for i in range(steps)]


def fit(
    case: Case, steps: int = 2, shards: int = 1, data: list[Batch] | None = None, **trainer_kwargs: Any
) -> CaseModule:
    """Train ``case`` for ``steps`` SGD steps on the CPU with ``trainer_kwargs`` (strategy, devices, ...),
    on ``data`` (default: :func:`batches`)."""
    module = CaseModule(case, shards=shards)
    kwargs: dict[str, Any] = {**TRAINING_ONLY, "accelerator": "cpu", "devices": 1, "max_steps": steps}
    kwargs.update(trainer_kwargs)
    loader = DataLoader(batches(case, steps=steps) if data is None else data, batch_size=None)  # type: ignore[arg-type]
    pl.Trainer(**kwargs).fit(module, loader)
    return module


@cache
def reference(case: Case, shards: int = 1, steps: int = 2) -> CaseModule:
    """Single-device training of ``case`` (cached: every strategy compares with the same run)."""
    return fit(case, steps=steps, shards=shards)


def assert_same_training(
    got: CaseModule, want: CaseModule, state: bool = True, rtol: float = 1e-10, atol: float = 1e-12
) -> None:
    """Every step's loss and every parameter's gradient agree (float64); with ``state``, so do the final
    parameters and buffers."""
    assert len(got.losses) == len(want.losses) > 0
    torch.testing.assert_close(got.losses, want.losses, rtol=rtol, atol=atol)
    assert len(got.grads) == len(want.grads)
    for step, (a, b) in enumerate(zip(got.grads, want.grads, strict=True)):
        assert a.keys() == b.keys(), f"step {step}: gradients of different parameters"
        for key in a:
            torch.testing.assert_close(
                a[key], b[key], rtol=rtol, atol=atol, msg=f"step {step}: grad of {key}"
            )
    if state:
        assert_same_state(got.state_dict(), want.state_dict(), rtol=rtol, atol=atol)


def assert_same_state(
    got: Mapping[str, Tensor], want: Mapping[str, Tensor], rtol: float = 1e-10, atol: float = 1e-12
) -> None:
    assert got.keys() == want.keys()
    for key in got:
        torch.testing.assert_close(
            got[key].cpu(), want[key].cpu(), rtol=rtol, atol=atol, msg=f"{key} differs"
        )
