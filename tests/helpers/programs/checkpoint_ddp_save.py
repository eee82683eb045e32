"""One of two gloo processes: wrap a tiny net in DDP, step once; rank 0 saves ``ddp.state_dict()``.

python checkpoint_ddp_save.py RANK INIT_FILE OUT
"""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch import nn


def main(rank: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)).double()
        ddp = nn.parallel.DistributedDataParallel(net)
        ddp(torch.randn(8, 4, dtype=torch.float64)).sum().backward()  # gradients all-reduced once
        if rank == 0:
            torch.save(ddp.state_dict(), out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3])
