"""Turn a device request into concrete torch devices, validated against what this process can see.

How it works: docs/internals.md, section ``lightning_gpupar/devices/requests.py``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, cast

import torch
from lightning.fabric.accelerators.cuda import num_cuda_devices
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.device_parser import _normalize_parse_gpu_string_input

from lightning_gpupar.devices import locks as device_locks
from lightning_gpupar.devices.nvml import GPUInfo, GPUInventory, read_gpus
from lightning_gpupar.devices.sizes import UNITS, format_bytes, parse_bytes
from lightning_gpupar.errors import GpuparError

__all__ = ["GPUInfo", "GPUInventory"]

DeviceRequest = int | str | Sequence[int] | None

_ACCELERATORS = ("auto", "cpu", "gpu", "cuda")


#: Set by a launching rank for each rank it starts: the GPU ids its ``"auto"`` resolved to, e.g. ``"2,0"``.
#: Those ranks take them instead of choosing again (free memory changes once rank 0 holds its GPU).
AUTO_IDS_ENV = "LIGHTNING_GPUPAR_AUTO_DEVICE_IDS"
#: Set by a launching rank in its own environment (its pid), beside the DDP variables it sets for its
#: children, so that it does not mistake itself for a rank started by another launcher.
LAUNCHER_PID_ENV = "LIGHTNING_GPUPAR_LAUNCHER_PID"


class DeviceSelectionError(GpuparError, ValueError):
    """A device request that cannot be satisfied; the message says what exists and what to write."""


@dataclass(frozen=True)
class DeviceSelection:
    """The concrete devices a request resolved to."""

    accelerator: Literal["cpu", "cuda"]
    devices: tuple[torch.device, ...] = field(default_factory=tuple)

    @property
    def trainer_devices(self) -> list[int] | int:
        """The value for ``Trainer(devices=...)``: CUDA ids, or a CPU device count."""
        if self.accelerator == "cuda":
            return [d.index for d in self.devices if d.index is not None]
        return len(self.devices)

    @property
    def cpu_stage(self) -> bool:
        """The CPU beside GPUs (``[0, 1, cpu]``): a device Lightning's ``devices=`` cannot name."""
        return self.accelerator == "cuda" and any(d.type == "cpu" for d in self.devices)

    def __len__(self) -> int:
        return len(self.devices)


def cuda_device_count() -> int:
    """How many CUDA devices this process sees (Lightning's NVML-based count: no CUDA context is created)."""
    return num_cuda_devices() if torch.cuda.is_available() else 0


def query_gpus() -> list[GPUInfo]:
    """Name, memory, utilisation and processes of every visible CUDA device (see :func:`query_inventory`)."""
    return list(query_inventory().gpus)


def query_inventory() -> GPUInventory:
    """The visible CUDA devices and where their numbers came from: NVML, which touches no GPU, or (without
    nvidia-ml-py or a driver NVML can reach) ``torch.cuda.mem_get_info``, which creates a CUDA context on
    every GPU it asks. Call it only when the answer is needed (``"auto"``, ``gpupar-devices``)."""
    return read_gpus(cuda_device_count())


def auto_select(gpus: Sequence[GPUInfo], min_free_bytes: int, count: int | None = None) -> list[int]:
    """Ids of the GPUs with the most free memory, at least ``min_free_bytes`` each, best first."""
    usable = sorted((g for g in gpus if g.free_bytes >= min_free_bytes), key=lambda g: -g.free_bytes)
    if count is not None:
        if count > len(usable):
            raise DeviceSelectionError(
                f"device_ids='auto:{count}' asks for {count} GPUs with at least "
                f"{format_bytes(min_free_bytes)} free, but only {len(usable)} qualify: "
                f"{_describe_gpus(gpus)}. Lower strategy.min_free_memory or ask for fewer GPUs."
            )
        usable = usable[:count]
    return [g.index for g in usable]


def external_launch() -> str | None:
    """The launcher that started this process as one of several ranks, when it was not this process's
    own DDP launcher (torchrun, SLURM, a Lightning launcher); ``None`` for a lone or launching process."""
    if os.environ.get(LAUNCHER_PID_ENV) == str(os.getpid()):
        return None  # the DDP variables were set by this process's own launcher, for its children
    world_size = os.environ.get("WORLD_SIZE", "")
    if world_size.isdigit() and int(world_size) > 1:
        name = "torchrun" if "TORCHELASTIC_RUN_ID" in os.environ else "a launcher"
        return f"{name} (WORLD_SIZE={world_size})"
    ntasks = os.environ.get("SLURM_NTASKS", "")
    # SLURMEnvironment.detect() warns whenever srun exists but is unused: ask it only about SLURM jobs
    if ntasks.isdigit() and int(ntasks) > 1 and SLURMEnvironment.detect():
        return f"SLURM (SLURM_NTASKS={ntasks})"
    return None


def _auto_gpu_ids(request: str, count: int | None, min_free_bytes: int, available: int) -> list[int]:
    """``"auto"``/``"auto:N"`` on GPUs: the launching rank's choice when this process is a rank it
    started, else the GPUs with the most free memory; refused in ranks started by another launcher."""
    launched = os.environ.get(AUTO_IDS_ENV)
    if launched is not None:
        return _launched_gpu_ids(request, launched, count, available)
    external = external_launch()
    if external is not None:
        raise DeviceSelectionError(
            f"device_ids={request!r} in a process started by {external}: each rank would choose GPUs by "
            "free memory on its own, at a different moment, so two ranks could share a GPU or disagree "
            "on how many there are. Name the GPUs (strategy.device_ids=[0,1,2,3]) or give a count "
            "(strategy.device_ids=4), the same on every node."
        )
    gpus = query_gpus()
    ids = auto_select(gpus, min_free_bytes, count)
    if not ids:
        raise DeviceSelectionError(
            f"device_ids='auto' found no GPU with at least {format_bytes(min_free_bytes)} "
            f"free: {_describe_gpus(gpus)}. Lower strategy.min_free_memory, name the ids, "
            "or use trainer.accelerator=cpu."
        )
    return _claim(request, gpus, auto_select(gpus, min_free_bytes), count)


def _claim(request: str, gpus: Sequence[GPUInfo], ranked: Sequence[int], count: int | None) -> list[int]:
    """The first ``count`` (or all) of ``ranked`` whose lock this process can take (:mod:`device_locks`),
    so that ``auto`` runs started together never pick the same GPU; this process's other locks go."""
    by_index = {g.index: g for g in gpus}
    chosen: list[int] = []
    busy: list[str] = []
    for index in ranked:
        uuid = by_index[index].uuid
        if uuid is not None and not device_locks.try_lock(uuid):
            busy.append(f"cuda:{index} (held by {device_locks.holder(uuid) or 'another run'})")
            continue
        chosen.append(index)
        if len(chosen) == count:
            break
    keep = {uuid for i in chosen if (uuid := by_index[i].uuid) is not None}
    device_locks.release(device_locks.held_here() - keep)
    if not chosen or (count is not None and len(chosen) < count):
        device_locks.release(keep)
        raise DeviceSelectionError(
            f"device_ids={request!r}: {len(ranked)} GPU(s) have enough free memory, but "
            f"{', '.join(busy)} {'is' if len(busy) == 1 else 'are'} taken by other gpupar runs started with "
            f"'auto', leaving {len(chosen)}{'' if count is None else f' of {count}'}. Wait for them, ask "
            f"for fewer GPUs, or name the GPUs (locks are not checked for named GPUs; lock files in "
            f"{device_locks.lock_dir()})."
        )
    return chosen


def _launched_gpu_ids(request: str, launched: str, count: int | None, available: int) -> list[int]:
    """The GPU ids the launching rank handed this rank in ``AUTO_IDS_ENV``, checked against this rank."""
    fix = "Name the GPUs in strategy.device_ids."
    try:
        ids = [int(i) for i in launched.split(",")]
    except ValueError:
        raise DeviceSelectionError(
            f"device_ids={request!r}: {AUTO_IDS_ENV}={launched!r} is not a comma-separated list of GPU "
            f"ids (e.g. '1,3'). This package's launcher sets it for its ranks: unset it. {fix}"
        ) from None
    if count is not None and len(ids) != count:
        raise DeviceSelectionError(
            f"device_ids={request!r}: the launching rank chose {len(ids)} GPUs {ids} ({AUTO_IDS_ENV}), "
            f"but this rank asks for {count}. {fix}"
        )
    unseen = [i for i in ids if not 0 <= i < available]
    if unseen:
        raise DeviceSelectionError(
            f"device_ids={request!r}: the launching rank chose GPUs {ids} ({AUTO_IDS_ENV}), but this rank "
            f"sees only {available} (ids 0..{available - 1}), not {unseen}. {fix}"
        )
    return ids


def resolve_devices(
    request: DeviceRequest,
    accelerator: str = "auto",
    *,
    default_cpu_count: int = 1,
    min_free_memory: int | str = "1GiB",
) -> DeviceSelection:
    """Resolve a device request (see the module docstring) into a validated :class:`DeviceSelection`."""
    if accelerator not in _ACCELERATORS:
        raise DeviceSelectionError(
            f"Unknown accelerator {accelerator!r}. Valid: {', '.join(_ACCELERATORS)} "
            "(trainer.accelerator=cpu for CPU devices)."
        )
    min_free_bytes = _min_free_bytes(min_free_memory)  # parsed everywhere, GPUs or not
    if isinstance(default_cpu_count, bool) or not isinstance(default_cpu_count, int) or default_cpu_count < 1:
        raise DeviceSelectionError(
            f"cpu_fallback={default_cpu_count!r} (strategy.cpu_fallback): the number of CPU devices 'auto' "
            "and 'cpu' mean without GPUs must be an int >= 1. Write e.g. strategy.cpu_fallback=2."
        )
    request = _normalize(request)
    available = cuda_device_count()
    want_cpu = accelerator == "cpu" or (accelerator == "auto" and available == 0)

    if request == "cpu":
        if accelerator in ("gpu", "cuda"):
            raise DeviceSelectionError(
                f"device_ids='cpu' with trainer.accelerator={accelerator}: the two disagree. Use "
                "trainer.accelerator=cpu for CPU devices, or GPU ids / a count / 'auto' for GPUs."
            )
        return _cpu(default_cpu_count)
    if isinstance(request, str):  # "auto" or "auto:N"
        if want_cpu:
            return _cpu(default_cpu_count if request == "auto" else int(request.split(":")[1]))
        _require_cuda(request, available)
        count = None if request == "auto" else int(request.split(":")[1])
        return _cuda(_auto_gpu_ids(request, count, min_free_bytes, available))
    if isinstance(request, int):
        if want_cpu:
            if request < 1:
                raise DeviceSelectionError(f"device_ids={request}: a CPU device count must be >= 1.")
            return _cpu(request)
        _require_cuda(request, available)
        if request == 0 or request < -1:
            raise DeviceSelectionError(
                f"device_ids={request} is not a device count: write a count >= 1, -1 for all "
                f"{available} visible GPUs, or a list of ids such as [0, 1]."
            )
        if request > available:
            raise DeviceSelectionError(
                f"device_ids={request} asks for {request} GPUs but this process sees {available}: "
                f"{_visible_note(available)}"
            )
        return _cuda(range(available) if request == -1 else range(request))

    ids = list(request)
    cpu_stage = _cpu_stage(list(ids), request)
    if cpu_stage is not None:
        ids.pop(cpu_stage)
    _check_ids(ids, request)
    if cpu_stage is not None:
        if accelerator == "cpu":
            return _cpu(len(ids) + 1)  # a dry run of the split on CPU devices: positions stay the same
        gpus = _cuda_ids(ids, available)
        return DeviceSelection("cuda", (*gpus[:cpu_stage], torch.device("cpu"), *gpus[cpu_stage:]))
    if accelerator == "cpu":
        if ids != list(range(len(ids))):
            raise DeviceSelectionError(
                f"device_ids={ids} with trainer.accelerator=cpu: CPU devices are counted, not chosen by id. "
                f"Write strategy.device_ids={len(ids)}."
            )
        return _cpu(len(ids))
    return DeviceSelection("cuda", _cuda_ids(ids, available))


def _cuda_ids(ids: list[int], available: int) -> tuple[torch.device, ...]:
    """The CUDA devices of ``ids``, each checked against what this process sees."""
    _require_cuda(ids, available)
    unknown = [i for i in ids if i >= available]
    if unknown:
        raise DeviceSelectionError(
            f"device_ids={ids}: no GPU with id {', '.join(map(str, unknown))}. {_visible_note(available)}"
        )
    return _cuda(ids).devices


def _cpu_stage(ids: Sequence[object], request: object) -> int | None:
    """The position of the one ``cpu`` item in a list of GPU ids (a CPU stage beside GPUs), if any."""
    found = [i for i, item in enumerate(ids) if isinstance(item, str) and item.strip().lower() == "cpu"]
    if len(found) > 1:
        raise DeviceSelectionError(
            f"device_ids={request!r}: 'cpu' appears {len(found)} times; the CPU is one device. Write it "
            "once, e.g. strategy.device_ids=[0,1,cpu]."
        )
    if found and len(ids) == 1:
        raise DeviceSelectionError(
            f"device_ids={request!r}: a list with only 'cpu'. For CPU devices write strategy.device_ids=cpu "
            "(or a count with trainer.accelerator=cpu); 'cpu' in a list adds the CPU beside GPUs."
        )
    return found[0] if found else None


def _min_free_bytes(value: int | str) -> int:
    """``min_free_memory`` in bytes, or an error naming the setting (it is checked on every machine)."""
    try:
        size = parse_bytes(value) if isinstance(value, int | str) and not isinstance(value, bool) else -1
    except ValueError:
        size = -1
    if size < 0:
        raise DeviceSelectionError(
            f"min_free_memory={value!r} (strategy.min_free_memory) is not a size: write a number >= 0 with "
            f"a unit ({', '.join(u for u in UNITS if u)}, any case), e.g. 512MiB, 10GiB or 1.5GB. It is "
            "checked on every machine, also where there is no GPU to apply it to."
        )
    return size


def _normalize(request: DeviceRequest) -> int | str | list[int]:
    """Lightning's string parsing (``"0,3"`` -> ``[0, 3]``, ``"2"`` -> 2) plus our ``auto``/``cpu`` words."""
    if request is None:
        return "auto"
    if isinstance(request, bool):
        raise DeviceSelectionError(f"device_ids={request!r} is not a device request. {_GRAMMAR}")
    if isinstance(request, str):
        text = request.strip().lower()
        if text in ("auto", "cpu") or re.fullmatch(r"auto:[1-9][0-9]*", text):
            return text
        items = [item.strip() for item in text.strip("[]").split(",")]
        if "cpu" in items:  # GPU ids and the CPU as a stage device: "0,1,cpu"
            try:
                return [item if item == "cpu" else int(item) for item in items]  # type: ignore[misc]
            except ValueError:
                raise DeviceSelectionError(
                    f"device_ids={request!r} is not a device request. {_GRAMMAR}"
                ) from None
        try:
            return _normalize_parse_gpu_string_input(text.strip("[]"))
        except ValueError:
            raise DeviceSelectionError(
                f"device_ids={request!r} is not a device request. {_GRAMMAR}"
            ) from None
    if isinstance(request, int):
        return request
    if isinstance(request, Sequence):
        return list(cast(Sequence[int], request))
    raise DeviceSelectionError(f"device_ids={request!r} is not a device request. {_GRAMMAR}")


_GRAMMAR = (
    "Valid: a list of GPU ids ([0,3] or '0,3'), a count (2), -1 (all GPUs), 'auto', 'auto:N' or 'cpu'; "
    "model_split also takes the CPU as a stage device beside GPU ids ([0,1,cpu])."
)


def _check_ids(ids: list[int], request: object) -> None:
    if not ids:
        raise DeviceSelectionError(f"device_ids={request!r} is empty. {_GRAMMAR}")
    if any(type(i) is not int for i in ids):
        raise DeviceSelectionError(f"device_ids={request!r}: every id must be an int. {_GRAMMAR}")
    negative = [i for i in ids if i < 0]
    if negative:
        raise DeviceSelectionError(
            f"device_ids={ids}: ids must be >= 0, got {negative}. Use -1 alone (not in a list) for all GPUs."
        )
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise DeviceSelectionError(
            f"device_ids={ids}: id {', '.join(map(str, duplicates))} appears more than once; "
            "each device can be used once."
        )


def _require_cuda(request: object, available: int) -> None:
    if available == 0:
        raise DeviceSelectionError(
            f"device_ids={request!r} asks for GPUs, but no CUDA device is visible to this process "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda is not None}). "
            f"{_visible_note(0)} To run on the CPU instead, use trainer.accelerator=cpu with a device count, "
            "e.g. strategy.device_ids=2."
        )


def _visible_note(available: int) -> str:
    ids = f"ids 0..{available - 1} exist" if available else "no GPU ids exist"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return f"This process sees {available} GPU(s): {ids}."
    return (
        f"This process sees {available} GPU(s): {ids}. CUDA_VISIBLE_DEVICES={visible!r} is set, so ids "
        "count from 0 within that list, not by the physical numbering nvidia-smi shows."
    )


def _describe_gpus(gpus: Sequence[GPUInfo]) -> str:
    return ", ".join(f"cuda:{g.index} {format_bytes(g.free_bytes)} free" for g in gpus) or "no GPUs"


def _cpu(count: int) -> DeviceSelection:
    return DeviceSelection("cpu", tuple(torch.device("cpu") for _ in range(count)))


def _cuda(ids: Sequence[int]) -> DeviceSelection:
    return DeviceSelection("cuda", tuple(torch.device("cuda", i) for i in ids))
