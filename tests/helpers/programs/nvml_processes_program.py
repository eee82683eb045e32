"""Print, as JSON, which GPUs NVML lists this process on: after choosing with ``auto`` (and, with an id
argument, after a dp step on that GPU). ``python nvml_processes_program.py [GPU_ID]``"""

from __future__ import annotations

import json
import os
import sys

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_gpupar.devices import query_inventory, resolve_devices
from lightning_gpupar.devices.nvml import cuda_handles, load_nvml, process_ids
from tests.helpers.equivalence import TinyNet


def where_listed() -> list[int]:
    nvml = load_nvml()
    return [
        i
        for i, h in enumerate(cuda_handles(nvml, torch.cuda.device_count()))
        if os.getpid() in process_ids(nvml, h)
    ]


resolve_devices("auto", "gpu", min_free_memory=0)
assert query_inventory().source == "nvml"
result = {"after_auto": where_listed(), "any_listed": None, "after_training": None}
if len(sys.argv) > 1:
    data = TensorDataset(torch.randn(16, 6, dtype=torch.float64), torch.randint(0, 3, (16,)))
    trainer = pl.Trainer(
        accelerator="gpu",
        devices=[int(sys.argv[1])],
        strategy="dp",
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(TinyNet(), DataLoader(data, batch_size=8))
    result["after_training"] = where_listed()
    nvml = load_nvml()
    result["any_listed"] = any(process_ids(nvml, h) for h in cuda_handles(nvml, torch.cuda.device_count()))
print(json.dumps(result))
