"""Train conformance cases (``tests/conformance/architectures.py``) with strategy=ddp on 2 CPU processes.

    python conformance_ddp.py OUT_DIR CASE [CASE ...]

For each case, every rank writes ``OUT_DIR/<case>-rank<r>.pt``: its losses, its gradients after each
backward (all-reduced by DDP) and its final state. Rank ``r`` trains on batches ``r``, ``r + 2``, ... of
:func:`rank_batches` (Lightning's DistributedSampler over a list of batches, not shuffled), so step ``k``'s
global batch is batches ``2k`` and ``2k + 1`` together.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.conformance.architectures import CASES
from tests.helpers.conformance import Batch, Case, batches, fit

STEPS, PER_RANK = 2, 4


def rank_batches(case: Case) -> list[Batch]:
    return batches(case, n=PER_RANK, steps=2 * STEPS)


def main(out: Path, names: list[str]) -> None:
    for name in names:
        case = next(c for c in CASES if c.name == name)
        module = fit(case, steps=STEPS, data=rank_batches(case), strategy="ddp", devices=2)
        record = {"losses": module.losses, "grads": module.grads, "state": module.state_dict()}
        torch.save(record, out / f"{name}-rank{module.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
