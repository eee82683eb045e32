"""Real architectures (``architectures.CASES``) under ``ddp`` on 2 CPU processes give single-device loss,
gradients and final state in float64 on the same global batches (each rank half of each)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conformance.architectures import CASES
from tests.helpers.conformance import CaseModule, assert_same_state, fit
from tests.helpers.programs import python, run_bounded
from tests.helpers.programs.conformance_ddp import STEPS, rank_batches

CHOSEN = ["gpt2", "t5", "mixtral", "vit", "whisper"]  # tied, encoder-decoder, experts, vision, speech


def single_device(name: str) -> CaseModule:
    """One device on the global batches: step ``k`` sees rank 0's and rank 1's batch ``k`` together."""
    case = next(c for c in CASES if c.name == name)
    per_rank = rank_batches(case)
    merged = [
        {key: torch.cat([per_rank[2 * k][key], per_rank[2 * k + 1][key]]) for key in per_rank[0]}
        for k in range(STEPS)
    ]
    return fit(case, steps=STEPS, data=merged)


@pytest.mark.slow
def test_ddp_equals_single_device_on_real_architectures(tmp_path: Path) -> None:
    finished = run_bounded(python("conformance_ddp.py", str(tmp_path), *CHOSEN), timeout=600, cwd=tmp_path)
    assert finished.returncode == 0, finished.stderr[-3000:]
    for name in CHOSEN:
        want = single_device(name)
        ranks = [torch.load(tmp_path / f"{name}-rank{r}.pt", weights_only=True) for r in (0, 1)]
        assert not torch.equal(ranks[0]["losses"][0], ranks[1]["losses"][0])  # each rank saw its half
        for step in range(STEPS):  # equal halves: the global loss is the mean of the ranks' losses
            loss = (ranks[0]["losses"][step] + ranks[1]["losses"][step]) / 2
            torch.testing.assert_close(loss, want.losses[step], rtol=1e-10, atol=1e-12, msg=name)
        for rank in ranks:
            for got, expected in zip(rank["grads"], want.grads, strict=True):
                assert got.keys() == expected.keys(), name
                for key in got:
                    torch.testing.assert_close(got[key], expected[key], rtol=1e-10, atol=1e-12, msg=key)
            assert_same_state(rank["state"], want.state_dict())
