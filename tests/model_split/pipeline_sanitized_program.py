"""Train a pipelined, checkpointed TransformerNet in bf16 with a deliberately slow first stage, under
``TORCH_CUDA_SANITIZER=1`` (torch's CUDA stream sanitizer raises on an unsynchronised access).

    TORCH_CUDA_SANITIZER=1 python pipeline_sanitized_program.py STEPS

Stages on cuda:0 and cuda:1 (both on cuda:0 with one GPU), 4 micro-batches, ``checkpoint="all"``.
Prints one JSON line: the pipelined and the unsplit first-step losses, every step's loss, and
``torch.cuda.memory_allocated`` per device after every step.
"""

from __future__ import annotations

import json
import sys

import torch
from torch import nn

from examples.models import TransformerNet
from lightning_gpupar.model_split import apply_placement, plan_placement
from lightning_gpupar.model_split.pipeline import install_pipeline

MAP = {"embed": 0, "blocks.0-1": 0, "blocks.2-3": 1, "head": 1}
SLEEP_CYCLES = 5_000_000  # a few ms per micro-batch: the producer finishes well after its consumer starts


def make() -> TransformerNet:
    torch.manual_seed(0)
    return TransformerNet(32, 64, 4, 4, 3, 16)


def main() -> None:
    steps = int(sys.argv[1])
    gpus = min(torch.cuda.device_count(), 2)
    devices = [torch.device("cuda", 0), torch.device("cuda", gpus - 1)]
    tokens = torch.randint(0, 32, (16, 16), generator=torch.Generator().manual_seed(1))
    target = torch.randn(16, 3, generator=torch.Generator().manual_seed(2))

    reference = make().to(devices[1])
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref_loss = float(
            nn.functional.mse_loss(reference(tokens.to(devices[1])).float(), target.to(devices[1]))
        )

    model = make()
    plan = plan_placement(model, devices, MAP)
    apply_placement(model, plan)
    install_pipeline(model, plan, list(MAP), chunks=4, checkpoint="all")
    model.embed.register_forward_pre_hook(lambda module, args: torch.cuda._sleep(SLEEP_CYCLES))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    losses, allocated = [], []
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(tokens.to(devices[0]))
        loss = nn.functional.mse_loss(out.float(), target.to(out.device))
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
        torch.cuda.synchronize()
        allocated.append([torch.cuda.memory_allocated(d) for d in sorted(set(devices), key=str)])
    print(json.dumps({"ref_loss": ref_loss, "losses": losses, "allocated": allocated}))


if __name__ == "__main__":
    main()
