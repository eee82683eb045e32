"""The benchmarks' step timer waits for every GPU a step used, not only the current one (issue 23 point 5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from benchmarks import common

GPU0, GPU1, CPU = torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cpu")


@pytest.mark.parametrize(
    ("strategy", "expected"),
    [
        (SimpleNamespace(root_device=GPU0, parallel_devices=[GPU0, GPU1], world_size=1), [GPU0, GPU1]),  # dp
        (SimpleNamespace(root_device=GPU1, parallel_devices=[GPU0, CPU, GPU1], world_size=1), [GPU0, GPU1]),
        (SimpleNamespace(root_device=GPU1, process_devices=[GPU1], world_size=2), [GPU1]),  # a DDP rank
        (SimpleNamespace(root_device=GPU0, parallel_devices=[GPU0, GPU1], world_size=2), [GPU0]),
        (SimpleNamespace(root_device=CPU, parallel_devices=[CPU, CPU], world_size=1), []),
    ],
)
def test_each_step_waits_for_every_gpu_the_strategy_uses(
    monkeypatch: pytest.MonkeyPatch, strategy: SimpleNamespace, expected: list[torch.device]
) -> None:
    synchronized: list[object] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: synchronized.append(device))
    timer, trainer = common.StepTimer(), SimpleNamespace(strategy=strategy)
    timer.on_train_batch_start(trainer)  # type: ignore[arg-type]
    assert synchronized == expected
    synchronized.clear()
    timer.on_train_batch_end(trainer)  # type: ignore[arg-type]
    assert synchronized == expected
