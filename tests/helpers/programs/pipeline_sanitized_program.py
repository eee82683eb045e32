"""Train a pipelined model with a deliberately slow first stage under ``TORCH_CUDA_SANITIZER=1`` (torch's
CUDA stream sanitizer raises on an unsynchronised access).

    TORCH_CUDA_SANITIZER=1 python pipeline_sanitized_program.py STEPS [DEVICES] [MODEL]

DEVICES: comma-separated, one per stage group (default: cuda:0,cuda:1, or cuda:0 twice with one GPU).
MODEL: ``transformer`` (default: TransformerNet in bf16, ``checkpoint="all"``) or ``batchnorm`` (a conv net
with deferred BatchNorm, float32). 4 micro-batches. Prints one JSON line: the pipelined and the unsplit
first-step losses, every step's loss, and ``torch.cuda.memory_allocated`` per device after every step.
"""

from __future__ import annotations

import contextlib
import json
import sys

import torch
from torch import nn

from examples.models import TransformerNet
from lightning_gpupar.model_split import apply_placement, plan_placement
from lightning_gpupar.model_split.pipeline import install_pipeline

SLEEP_CYCLES = 5_000_000  # a few ms per micro-batch: the producer finishes well after its consumer starts


class ConvNet(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(2, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.Sequential(nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 16), nn.BatchNorm1d(16)),
            nn.Linear(16, 3),
        )


def make(model: str) -> nn.Module:
    torch.manual_seed(0)
    return TransformerNet(32, 64, 4, 4, 3, 16) if model == "transformer" else ConvNet()


def placement(model: str, stages: int) -> dict[str, int]:
    last = stages - 1
    if model == "transformer":
        return {"embed": 0, "blocks.0-1": min(1, last), "blocks.2-3": last, "head": last}
    return {"0": 0, "1": 0, "2": min(1, last), "3": last}


def main() -> None:
    steps = int(sys.argv[1])
    gpus = min(torch.cuda.device_count(), 2)
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["cuda:0", f"cuda:{gpus - 1}"]
    kind = sys.argv[3] if len(sys.argv) > 3 else "transformer"
    devices = [torch.device(n) for n in names]
    out_device = devices[-1]
    g = torch.Generator().manual_seed(1)
    if kind == "transformer":
        inputs = torch.randint(0, 32, (16, 16), generator=g)
        autocast: contextlib.AbstractContextManager = torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        inputs = torch.randn(16, 2, 6, 6, generator=g)
        autocast = contextlib.nullcontext()
    target = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))
    stage_map = placement(kind, len(devices))

    reference = make(kind).to(out_device)
    with autocast:
        ref_out = reference(inputs.to(out_device)).detach().float()
        ref_loss = float(nn.functional.mse_loss(ref_out, target.to(out_device)))

    model = make(kind)
    plan = plan_placement(model, devices, stage_map)
    apply_placement(model, plan)
    recompute = "all" if kind == "transformer" else None
    install_pipeline(model, plan, list(stage_map), chunks=4, recompute=recompute)
    first = model.get_submodule(next(iter(stage_map)))
    if devices[0].type == "cuda":
        first.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(SLEEP_CYCLES))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses, allocated = [], []
    cuda = sorted({d for d in devices if d.type == "cuda"}, key=str)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = model(inputs.to(devices[0]))
        loss = nn.functional.mse_loss(out.float(), target.to(out.device))
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        if cuda:
            torch.cuda.synchronize()
        allocated.append([torch.cuda.memory_allocated(d) for d in cuda])
    print(json.dumps({"ref_loss": ref_loss, "losses": losses, "allocated": allocated}))


if __name__ == "__main__":
    main()
