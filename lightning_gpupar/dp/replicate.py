"""Per-step module replicas for data parallelism, on any list of devices (CPU included).

How it works: docs/internals.md, section ``lightning_gpupar/dp/replicate.py``.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.cuda import comm
from torch.nn.parallel._functions import Broadcast
from torchmetrics import Metric

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def copy_tensors(
    tensors: Sequence[Tensor], devices: Sequence[torch.device], share_first: bool
) -> list[list[Tensor]]:
    """``tensors`` copied to each device; ``result[j][i]`` is tensor ``i`` on ``devices[j]``.

    Copies of tensors that require grad stay in the autograd graph. With ``share_first``, the first device
    gets the original tensors (when they already live there). CUDA uses torch's coalesced broadcast.
    """
    if not tensors:
        return [[] for _ in devices]
    distinct_gpus = all(d.type == "cuda" for d in devices) and len(set(devices)) == len(devices)
    if distinct_gpus and all(t.is_cuda for t in tensors):
        requires_grad = any(t.requires_grad for t in tensors)
        if requires_grad and torch.is_grad_enabled():
            flat = Broadcast.apply([d.index for d in devices], *tensors)
            n = len(tensors)
            return [list(flat[j * n : (j + 1) * n]) for j in range(len(devices))]
        return [list(c) for c in comm.broadcast_coalesced([t.detach() for t in tensors], devices)]
    copies = []
    for j, device in enumerate(devices):
        if j == 0 and share_first:
            copies.append([t if t.device == device else t.to(device) for t in tensors])
        elif all(t.device == device for t in tensors):
            # Same device: parameters become aliases in the graph (gradients reach the leaf); buffers clones.
            copies.append([t.view_as(t) if t.requires_grad else t.detach().clone() for t in tensors])
        else:
            copies.append([t.to(device) if t.requires_grad else t.detach().to(device) for t in tensors])
    return copies


def replicate(root: ModuleT, devices: Sequence[torch.device]) -> list[ModuleT]:
    """One replica of ``root`` per device, sharing parameters through autograd (see module docstring)."""
    metrics = [m for m in root.modules() if isinstance(m, Metric)]
    inside_metrics = {id(sub) for metric in metrics for sub in metric.modules() if sub is not metric}
    modules = [m for m in root.modules() if id(m) not in inside_metrics]
    index = {id(m): i for i, m in enumerate(modules)}

    # Each tensor once, however many modules hold it (tied weights): every holder gets the same copy.
    own = [m for m in modules if not isinstance(m, Metric)]
    params = list({id(p): p for m in own for p in m._parameters.values() if p is not None}.values())
    buffers = list({id(b): b for m in own for b in m._buffers.values() if b is not None}.values())
    param_copies = copy_tensors(params, devices, share_first=True)
    buffer_copies = copy_tensors(buffers, devices, share_first=True)
    param_index = {id(p): i for i, p in enumerate(params)}
    buffer_index = {id(b): i for i, b in enumerate(buffers)}

    replicas: list[list[nn.Module]] = [
        [_fresh_metric(m, d) if isinstance(m, Metric) else m._replicate_for_data_parallel() for m in modules]
        for d in devices
    ]
    for j, device in enumerate(devices):
        for module, replica in zip(modules, replicas[j], strict=True):
            if isinstance(module, Metric):
                continue
            for name, child in module._modules.items():
                replica._modules[name] = None if child is None else replicas[j][index[id(child)]]
            for name, param in module._parameters.items():
                if param is None:  # `bias=False`: the attribute exists and is None, as on the root
                    replica._parameters[name] = None
                else:
                    _hold_parameter(replica, name, param_copies[j][param_index[id(param)]])
            for name, buf in module._buffers.items():
                replica._buffers[name] = None if buf is None else buffer_copies[j][buffer_index[id(buf)]]
            _own_hooks(replica)
            if "_device" in replica.__dict__:  # Lightning's DeviceDtypeModuleMixin: `self.device`
                replica.__dict__["_device"] = device
    return [r[0] for r in replicas]  # type: ignore[misc]


def _hold_parameter(replica: nn.Module, name: str, tensor: Tensor) -> None:
    """Make ``tensor`` the replica's parameter ``name``: what ``replica.name``, ``parameters()`` and
    ``named_parameters()`` (of the replica and of every module above it) answer.

    torch's replicas hold the copies as plain attributes, so their ``parameters()`` is empty and
    ``next(self.parameters())`` (transformers' ``model.device`` / ``dtype``) raises ``StopIteration``. Here
    the copy goes into the replica's own ``_parameters`` dict (a fresh one per replica, the root's untouched),
    as torch's replicas held it before 1.5: a non-leaf tensor, so gradients flow to the root's parameter,
    the one optimizers hold. ``setattr`` first, so that modules watching their attributes (an RNN's
    ``_flat_weights``) see the copy."""
    setattr(replica, name, tensor)  # a Parameter (first replica, root device) is registered by setattr
    if name in replica.__dict__:  # a non-leaf copy, set as a plain attribute: move it where parameters live
        replica._parameters[name] = replica.__dict__.pop(name)


#: The hook dictionaries of ``nn.Module`` (forward, forward-pre, with-kwargs, always-called, backward,
#: state-dict, load-state-dict hooks): every ``OrderedDict`` attribute ``Module()`` starts with.
_HOOK_DICTS = tuple(
    name for name, value in vars(nn.Module()).items() if "hook" in name and isinstance(value, dict)
)


def _own_hooks(replica: nn.Module) -> None:
    """Give the replica copies of its module's hook dictionaries: hooks registered on the root before the
    step run in the replica too, hooks registered during the step (transformers registers its
    ``output_hidden_states`` hooks lazily) stay in the replica and die with it."""
    for name in _HOOK_DICTS:
        hooks = replica.__dict__.get(name)
        if hooks is not None:
            replica.__dict__[name] = type(hooks)(hooks)


#: An empty copy of each root metric, made once: cloning the root every step would copy its whole epoch
#: state (lists of predictions for AUROC and the like) only to reset it.
_EMPTY_METRICS: weakref.WeakKeyDictionary[Metric, Metric] = weakref.WeakKeyDictionary()


def _fresh_metric(metric: Metric, device: torch.device) -> Metric:
    """A copy of ``metric`` with empty state on ``device``; the step's updates are merged back later."""
    empty = _EMPTY_METRICS.get(metric)
    if empty is None:
        empty = _EMPTY_METRICS[metric] = metric.clone()
        empty.reset()
    return empty.clone().to(device)
