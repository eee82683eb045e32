"""DDP on 2 CPU processes computes what one device computes on the same global batch (float64)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, DistributedSampler

from tests.helpers.programs import python, run_bounded
from tests.helpers.programs.equivalence import make_optimizer, problem

STEPS = 5
PER_RANK_BATCH = 4
RTOL, ATOL = 1e-10, 1e-12


def global_batches(data: Dataset) -> list[list[int]]:
    """The sample ids of each global batch: Lightning gives each rank a shuffled DistributedSampler."""
    orders: list[list[int]] = [
        list(DistributedSampler(data, num_replicas=2, rank=r, shuffle=True, seed=0)) for r in (0, 1)
    ]
    b = PER_RANK_BATCH
    return [orders[0][k * b : (k + 1) * b] + orders[1][k * b : (k + 1) * b] for k in range(STEPS)]


def single_device_reference() -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """First loss, first gradients and final weights of a plain loop over the same global batches."""
    net, data = problem()
    optimizer = make_optimizer(net.parameters())
    x, y = data.tensors
    first_loss, first_grads = torch.tensor(0.0), {}
    for step, ids in enumerate(global_batches(data)):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x[ids]), y[ids])
        loss.backward()
        if step == 0:
            first_loss = loss.detach()
            first_grads = {
                n: p.grad.detach().clone() for n, p in net.named_parameters() if p.grad is not None
            }
        optimizer.step()
    return first_loss, first_grads, {n: p.detach() for n, p in net.named_parameters()}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "ddp_split", "ddp_split_1f1b"])
def test_two_processes_match_one_device(tmp_path: Path, mode: str) -> None:
    """ddp: one device per process; ddp_split: 2 devices per process, 2 stages, 2 micro-batches;
    ddp_split_1f1b: the same under schedule="1f1b" with 3 uneven micro-batches (2, 1, 1)."""
    chunks = 3 if mode == "ddp_split_1f1b" else 2
    finished = run_bounded(
        python(
            "equivalence.py", str(tmp_path), str(STEPS), str(PER_RANK_BATCH), mode, "cpu", "2", str(chunks)
        ),
        timeout=150,
        cwd=tmp_path,
    )
    assert finished.returncode == 0, finished.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    ref_loss, ref_grads, ref_weights = single_device_reference()

    if mode.startswith("ddp_split"):
        sizes = [len(part) for part in torch.arange(PER_RANK_BATCH).tensor_split(chunks)]
        for rank in ranks:
            assert rank["positions"] == {"net.0": 0, "net.2": 1}
            assert rank["microbatch_sizes"] == sizes * STEPS
    # each rank saw half of the global batch: the mean of their losses is the global loss
    assert not torch.allclose(ranks[0]["loss"], ranks[1]["loss"])
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, ref_loss, rtol=RTOL, atol=ATOL)
    for rank in ranks:
        assert rank["grads"].keys() == ref_grads.keys()
        for name, grad in ref_grads.items():
            torch.testing.assert_close(rank["grads"][name], grad, rtol=RTOL, atol=ATOL)
        for name, weight in ref_weights.items():
            assert rank["weights"][name].dtype == torch.float64
            torch.testing.assert_close(rank["weights"][name], weight, rtol=RTOL, atol=ATOL)
