"""NCCL: ``ddp`` with 1 and 2 ranks, and ``ddp_split`` as 1 process x 2 GPUs, equal single-device training
(float64). Skipped without enough GPUs; the same program runs on 2 CPU processes in test_ddp_equivalence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from tests.helpers.markers import requires_cuda
from tests.helpers.programs import python, run_bounded
from tests.helpers.programs.equivalence import make_optimizer, problem

pytestmark = [pytest.mark.cuda, requires_cuda, pytest.mark.slow]

STEPS = 4
PER_RANK_BATCH = 4
RTOL, ATOL = 1e-9, 1e-11  # float64; CUDA and CPU kernels sum in different orders


def reference(ranks: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """First-step loss and final weights of a plain loop over the global batches ``ranks`` ranks see."""
    net, data = problem()
    optimizer = make_optimizer(net.parameters())
    x, y = data.tensors
    orders = [
        list(DistributedSampler(data, num_replicas=ranks, rank=r, shuffle=True, seed=0)) for r in range(ranks)
    ]
    b = PER_RANK_BATCH
    first_loss = torch.tensor(0.0)
    for step in range(STEPS):
        ids = [i for order in orders for i in order[step * b : (step + 1) * b]]
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(net(x[ids]), y[ids])
        loss.backward()
        optimizer.step()
        if step == 0:
            first_loss = loss.detach()
    return first_loss, {n: p.detach() for n, p in net.named_parameters()}


def _run(tmp_path: Path, mode: str, processes: int, chunks: int = 1) -> list[dict[str, object]]:
    gpus = processes * (2 if mode == "ddp_split" else 1)
    if torch.cuda.device_count() < gpus:
        pytest.skip(f"needs {gpus} GPUs, found {torch.cuda.device_count()}")
    args = [str(tmp_path), str(STEPS), str(PER_RANK_BATCH), mode, "gpu", str(processes), str(chunks)]
    finished = run_bounded(python("equivalence.py", *args), timeout=240, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(processes)]


def _assert_matches(ranks: list[dict[str, object]]) -> None:
    ref_loss, ref_weights = reference(len(ranks))
    losses = torch.stack([torch.as_tensor(r["loss"]).cpu() for r in ranks])
    torch.testing.assert_close(losses.mean(), ref_loss, rtol=RTOL, atol=ATOL)
    for rank in ranks:
        assert rank["backend"] == "nccl"
        weights = rank["weights"]
        assert isinstance(weights, dict)
        for name, weight in ref_weights.items():
            torch.testing.assert_close(weights[name].cpu(), weight, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("processes", [1, 2])
def test_nccl_ddp_matches_one_device(tmp_path: Path, processes: int) -> None:
    _assert_matches(_run(tmp_path, "ddp", processes))


@pytest.mark.parametrize("chunks", [1, 2])
def test_nccl_ddp_split_one_process_two_gpus_matches_one_device(tmp_path: Path, chunks: int) -> None:
    (rank,) = ranks = _run(tmp_path, "ddp_split", 1, chunks)
    assert rank["positions"] == {"net.0": 0, "net.2": 1}
    assert rank["devices"] == ["cuda:0", "cuda:1"]
    assert rank["microbatch_sizes"] == [PER_RANK_BATCH // chunks] * (chunks * STEPS)
    _assert_matches(ranks)


@pytest.mark.parametrize("chunks", [1, 2])
def test_nccl_ddp_split_one_process_on_one_gpu_twice_matches_one_device(tmp_path: Path, chunks: int) -> None:
    """The one-GPU variant of the test above: the group [cuda:0, cuda:0] under NCCL (the unbound process
    group, ``barrier(device_ids)``, the plan check, DDP over a module on several device entries)."""
    args = [str(tmp_path), str(STEPS), str(PER_RANK_BATCH), "ddp_split", "gpu", "1", str(chunks)]
    args.append("cuda:0,cuda:0")
    finished = run_bounded(python("equivalence.py", *args), timeout=240, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    rank = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert rank["positions"] == {"net.0": 0, "net.2": 1}
    assert rank["devices"] == ["cuda:0"]
    assert rank["microbatch_sizes"] == [PER_RANK_BATCH // chunks] * (chunks * STEPS)
    _assert_matches([rank])
