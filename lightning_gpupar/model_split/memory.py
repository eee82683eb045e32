"""What training a module needs in memory, per submodule, computed before anything moves.

How it works: docs/internals.md, section ``lightning_gpupar/model_split/memory.py``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor, nn
from torch.optim import SGD, Adam, AdamW, Optimizer

from lightning_gpupar.model_split.paths import is_within

#: Optimizers with two state tensors per parameter (``exp_avg``, ``exp_avg_sq``; three with ``amsgrad``).
_ADAM_STYLE = (Adam, AdamW)


@dataclass(frozen=True)
class MemoryParts:
    """Bytes of each part of training memory (one submodule, or one device)."""

    params: int = 0
    buffers: int = 0
    grads: int = 0
    optimizer: int = 0
    activations: int = 0

    @property
    def total(self) -> int:
        return self.params + self.buffers + self.grads + self.optimizer + self.activations

    def __add__(self, other: MemoryParts) -> MemoryParts:
        return MemoryParts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))


@dataclass
class ModelMemory:
    """Per-module memory of one model: own parts by module path, plus who owns each shared tensor."""

    own: dict[str, MemoryParts]  # module path -> the parts of its own tensors and its own saved activations
    order: dict[str, int]  # module path -> execution order (first call in the example forward), else -1
    sources: dict[str, str] = field(default_factory=dict)  # "optimizer"/"activations" -> how it was found
    tied: dict[str, str] = field(default_factory=dict)  # "path.name" of a shared parameter -> its owner's

    def parts(self, path: str, own_only: bool = False) -> MemoryParts:
        """The parts of the module at ``path``: its subtree's, or with ``own_only`` just its own."""
        if own_only:
            return self.own.get(path, MemoryParts())
        total = MemoryParts()
        for other, parts in self.own.items():
            if is_within(other, path):
                total = total + parts
        return total

    @property
    def activations_known(self) -> bool:
        return "measured" in self.sources.get("activations", "")


def measure_model(
    root: nn.Module, optimizer: Optimizer | None = None, example_input: Any = None
) -> ModelMemory:
    """Every part of training memory for every submodule of ``root`` (see the module docstring)."""
    per_param, optimizer_source = optimizer_state_bytes(root, optimizer)
    activations, order, activation_source = measure_activations(root, example_input)
    own: dict[str, MemoryParts] = {}
    tied: dict[str, str] = {}
    owner_of: dict[int, str] = {}
    for path, module in root.named_modules():
        params = buffers = grads = state = 0
        for name, param in module.named_parameters(recurse=False):
            full = f"{path}.{name}" if path else name
            if id(param) in owner_of:
                tied[full] = owner_of[id(param)]
                continue
            owner_of[id(param)] = full
            nbytes = param.numel() * param.element_size()
            params += nbytes
            grads += nbytes if param.requires_grad else 0
            state += per_param.get(id(param), 0)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and id(buffer) not in owner_of:
                owner_of[id(buffer)] = f"{path}.{name}" if path else name
                buffers += buffer.numel() * buffer.element_size()
        own[path] = MemoryParts(params, buffers, grads, state, activations.get(path, 0))
    sources = {"optimizer": optimizer_source, "activations": activation_source}
    return ModelMemory(own, order, sources, tied)


# ------------------------------------------------------------------------------------------- optimizer


def optimizer_state_bytes(root: nn.Module, optimizer: Optimizer | None) -> tuple[dict[int, int], str]:
    """Bytes of optimizer state per parameter (by ``id``), and how they were found."""
    trainable = [p for p in root.parameters() if p.requires_grad]
    if optimizer is None:
        return {id(p): 2 * _nbytes(p) for p in trainable}, "assumed Adam-style (2 tensors per parameter)"
    name = type(optimizer).__name__
    per_param: dict[int, int] = {}
    if isinstance(optimizer, _ADAM_STYLE):
        for group in optimizer.param_groups:
            count = 3 if group.get("amsgrad") else 2
            per_param.update({id(p): count * _nbytes(p) for p in group["params"] if p.requires_grad})
        return per_param, f"{name}: 2 tensors per parameter (3 with amsgrad)"
    if type(optimizer) is SGD:
        for group in optimizer.param_groups:
            count = 1 if group.get("momentum") else 0
            per_param.update({id(p): count * _nbytes(p) for p in group["params"] if p.requires_grad})
        return per_param, f"{name}: 1 tensor per parameter with momentum, none without"
    try:
        return _measure_on_meta(optimizer), f"{name}: measured by one step on the meta device"
    except Exception as err:  # an optimizer that cannot step on meta tensors
        fallback = {id(p): 2 * _nbytes(p) for p in trainable}
        return fallback, f"{name}: assumed 2 tensors per parameter (a meta step failed: {_short(err)})"


def _measure_on_meta(optimizer: Optimizer) -> dict[int, int]:
    """One ``step()`` of ``optimizer``'s class and options on meta copies of its parameters."""
    copies: dict[int, Tensor] = {}
    groups = []
    for group in optimizer.param_groups:
        metas = []
        for param in group["params"]:
            meta = torch.empty_like(param, device="meta").requires_grad_(param.requires_grad)
            meta.grad = torch.empty_like(meta) if param.requires_grad else None
            copies[id(param)] = meta
            metas.append(meta)
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": metas})
    probe = type(optimizer)(groups, **optimizer.defaults)
    probe.step()
    sizes = {}
    for original, meta in copies.items():
        state = probe.state.get(meta, {})
        sizes[original] = sum(
            _nbytes(v) for v in state.values() if isinstance(v, Tensor) and v.device.type == "meta"
        )
    return sizes


# ------------------------------------------------------------------------------------------- activations


def measure_activations(root: nn.Module, example_input: Any) -> tuple[dict[str, int], dict[str, int], str]:
    """Saved-activation bytes per module (the innermost one running), the modules' execution order, and
    how they were found; empty when there is no example input or no forward could run.

    The forward runs on the meta device; a model whose forward needs values (``.item()``, data-dependent
    shapes) runs on its own CPU tensors instead, when it has them (buffers cloned, nothing kept)."""
    if example_input is None:
        return {}, {}, "not counted: no example input (set the LightningModule's example_input_array)"
    try:
        saved, order = _saved_by_module(root, example_input, "meta")
        where = "measured on the meta device"
    except Exception as err:
        on_cpu = all(t.device.type == "cpu" for t in [*root.parameters(), *root.buffers()])
        if not on_cpu:
            return {}, {}, f"not counted: the example forward failed on the meta device ({_short(err)})"
        try:
            saved, order = _saved_by_module(root, example_input, "cpu")
        except Exception as cpu_err:
            return {}, {}, f"not counted: the example forward failed ({_short(cpu_err)})"
        where = f"measured by a CPU forward (the meta device could not run it: {_short(err)})"
    batch = _batch_size(example_input)
    return saved, order, where + (f" (example input, batch of {batch})" if batch is not None else "")


def _saved_by_module(
    root: nn.Module, example_input: Any, device: str
) -> tuple[dict[str, int], dict[str, int]]:
    """Run the forward with stand-ins on ``device`` for every parameter and buffer; count saved tensors."""
    meta = device == "meta"
    moved = apply_to_collection(example_input, Tensor, lambda t: t.to(device))
    args, kwargs = _as_call(moved)
    names = {id(m): path for path, m in root.named_modules()}
    tensors = [*root.named_parameters(remove_duplicate=False), *root.named_buffers()]
    if meta:
        stand_ins = {name: _meta_like(t) for name, t in tensors if t is not None}
    else:  # the parameters themselves; buffers cloned, so that running statistics do not move
        stand_ins = {name: t if isinstance(t, nn.Parameter) else t.clone() for name, t in tensors}
    excluded = {_key(t) for t in stand_ins.values()}
    running: list[str] = []
    order: dict[str, int] = {}
    saved: dict[str, int] = {}
    kept: dict[int, Tensor] = {}  # keeps every counted storage alive, so that its key stays unique

    def enter(module: nn.Module, *_: Any) -> None:
        path = names.get(id(module), "")
        order.setdefault(path, len(order))
        running.append(path)

    def leave(module: nn.Module, *_: Any) -> None:
        if running:
            running.pop()

    def pack(tensor: Tensor) -> Tensor:
        key = _key(tensor)
        if key not in excluded and key not in kept:
            kept[key] = tensor
            where = running[-1] if running else ""
            saved[where] = saved.get(where, 0) + tensor.untyped_storage().nbytes()
        return tensor

    hooks = [m.register_forward_pre_hook(enter) for m in root.modules()]
    hooks += [m.register_forward_hook(leave, always_call=True) for m in root.modules()]
    # functional_call restores name by name: a module under two names (nn.Sequential(conv, conv)) would
    # get a stand-in back for its second name, so every module's own tensors are put back here
    own = [(m, d, n, t) for m in root.modules() for d in (m._parameters, m._buffers) for n, t in d.items()]
    try:
        with (
            _training_mode(root),
            torch.random.fork_rng(devices=[]),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        ):
            torch.func.functional_call(root, stand_ins, args, kwargs, tie_weights=False, strict=False)
    finally:
        for hook in hooks:
            hook.remove()
        for _, tensors_of, name, tensor in own:
            tensors_of[name] = tensor  # type: ignore[assignment]
    return saved, order


def _key(tensor: Tensor) -> int:
    """A saved tensor's storage (views and aliases share it), on meta as on real devices."""
    return int(tensor.untyped_storage()._cdata)


def _meta_like(tensor: Tensor) -> Tensor:
    meta = torch.empty_like(tensor, device="meta")
    return nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta


def _as_call(example: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Lightning's convention for ``example_input_array``: a tuple is the positional arguments, a dict the
    keyword arguments, anything else the one argument."""
    if isinstance(example, tuple):
        return example, {}
    if isinstance(example, Mapping):
        return (), dict(example)
    return (example,), {}


def _batch_size(example: Any) -> int | None:
    sizes: list[int] = []
    apply_to_collection(example, Tensor, lambda t: sizes.append(t.shape[0]) if t.dim() else None)
    return sizes[0] if sizes else None


@contextlib.contextmanager
def _training_mode(root: nn.Module) -> Iterator[None]:
    """Train mode (dropout masks are saved activations too), each module's own flag restored on exit."""
    flags = [(m, m.training) for m in root.modules()]
    root.train()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _nbytes(tensor: Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0][:160]}" if text else type(err).__name__


def charge(units: list[tuple[str, bool]], memory: ModelMemory) -> list[MemoryParts]:
    """The training memory of each unit ``(path, own_only)``, given in execution order.

    A unit holds the parts of the modules it covers. A module no unit covers (a parameter-free one such as
    dropout, or a parent's own computation) holds no tensors, but its saved activations live where it
    runs: with the last unit that ran before it (the first unit, if none did).
    """
    charged = [MemoryParts() for _ in units]
    firsts = [_first_call(path, own_only, memory.order) for path, own_only in units]
    for path, parts in memory.own.items():
        if parts.total == 0 or not units:
            continue
        index = _covering(units, path)
        if index is None:
            index = _preceding(firsts, memory.order.get(path))
        charged[index] = charged[index] + parts
    return charged


def _covering(units: list[tuple[str, bool]], path: str) -> int | None:
    for index, (unit, own_only) in enumerate(units):
        if path == unit or (not own_only and is_within(path, unit)):
            return index
    return None


def _preceding(firsts: list[int | None], here: int | None) -> int:
    """The last unit whose first call came before ``here`` (the first unit when none did)."""
    best = 0
    if here is not None:
        for index, first in enumerate(firsts):
            if first is not None and first <= here:
                best = index
    return best


def _first_call(path: str, own_only: bool, order: Mapping[str, int]) -> int | None:
    if own_only:
        return order.get(path)
    calls = [index for other, index in order.items() if is_within(other, path)]
    return min(calls) if calls else None
