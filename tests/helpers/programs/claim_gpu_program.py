"""A run that chooses one GPU with ``device_ids=auto:1`` (fake NVML on its path) and holds it.

Prints ``ready``, then obeys lines on stdin: ``claim GO_FILE`` waits until ``GO_FILE`` exists, resolves
``auto:1`` and prints the chosen CUDA id (or ``error: ...``), holding the GPU; ``release`` lets it go and
prints ``released``. Exits when stdin closes.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from lightning_gpupar.devices import DeviceSelectionError, resolve_devices
from lightning_gpupar.devices import locks as device_locks
from lightning_gpupar.devices import requests as devices

devices.cuda_device_count = lambda: int(os.environ["FAKE_GPU_COUNT"])  # a CPU build of torch sees none

print("ready", flush=True)
for line in sys.stdin:
    command, _, argument = line.strip().partition(" ")
    if command == "claim":
        deadline = time.monotonic() + 60
        while not Path(argument).exists() and time.monotonic() < deadline:
            time.sleep(0.001)
        try:
            print(resolve_devices("auto:1", "gpu").trainer_devices[0], flush=True)  # type: ignore[index]
        except DeviceSelectionError as err:
            print(f"error: {err}", flush=True)
    elif command == "release":
        device_locks.release(device_locks.held_here())
        print("released", flush=True)
