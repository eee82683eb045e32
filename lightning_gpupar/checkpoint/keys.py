"""Canonical state-dict keys: the wrapper segments that DataParallel, DDP, torch.compile and Fabric add.

From keys alone, a segment counts as a wrapper only where all its siblings (submodules and tensors
alike) are wrapper segments too (the wrappers own no parameters of their own), so a user's attribute
that happens to be called ``module`` next to other attributes or parameters is left alone. When the
module that produced the state dict is at hand (saving), the wrappers are read off the module itself
instead: only the inner attribute of a real DataParallel, DDP, ``torch.compile`` or Fabric wrapper is
removed, so even a lone attribute named ``module`` keeps its name.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from lightning_gpupar.errors import GpuparError

WRAPPER_SEGMENTS = frozenset({"module", "_orig_mod", "_forward_module", "_original_module"})


class CheckpointError(GpuparError):
    """Base class of every checkpoint error this package raises."""


class KeyCollisionError(CheckpointError, ValueError):
    """Two different values would land on the same canonical key."""


def wrapper_paths(module: torch.nn.Module) -> frozenset[str]:
    """Dotted paths of the attributes through which wrappers inside ``module`` hold what they wrap."""
    from lightning.fabric.wrappers import _FabricModule
    from torch._dynamo.eval_frame import OptimizedModule

    inner = {
        torch.nn.DataParallel: ("module",),
        torch.nn.parallel.DistributedDataParallel: ("module",),
        OptimizedModule: ("_orig_mod",),
        _FabricModule: ("_forward_module", "_original_module"),
    }
    paths: set[str] = set()
    for path, sub in module.named_modules(remove_duplicate=False):
        for kind, attrs in inner.items():
            if isinstance(sub, kind):
                paths.update(f"{path}.{a}" if path else a for a in attrs)
    return frozenset(paths)


class KeyTree:
    """The tree of dotted keys, answering which segments of a path are wrapper segments.

    With ``wrappers`` (from :func:`wrapper_paths`), exactly those paths are wrapper segments.
    """

    def __init__(self, keys: Iterable[str], wrappers: frozenset[str] | None = None) -> None:
        self._wrappers = wrappers
        self._children: dict[tuple[str, ...], set[str]] = defaultdict(set)
        for key in keys:  # every segment, the tensor's own name included, is a child of its parent path
            segments = key.split(".")
            for i in range(len(segments)):
                self._children[tuple(segments[:i])].add(segments[i])

    def canonical(self, path: str, *, is_key: bool = True) -> str:
        """``path`` without wrapper segments; a key's last segment (the tensor's name) always stays."""
        if not path:
            return path
        segments = path.split(".")
        last = len(segments) - 1 if is_key else len(segments)
        kept = [s for i, s in enumerate(segments) if i >= last or not self._is_wrapper(segments, i)]
        return ".".join(kept)

    def _is_wrapper(self, segments: list[str], i: int) -> bool:
        if self._wrappers is not None:
            return ".".join(segments[: i + 1]) in self._wrappers
        if segments[i] not in WRAPPER_SEGMENTS:
            return False
        siblings = self._children.get(tuple(segments[:i]), {segments[i]})
        return siblings <= WRAPPER_SEGMENTS


def canonical_names(keys: Iterable[str]) -> dict[str, str]:
    """Map every key to its canonical form (``model.module.0.weight`` -> ``model.0.weight``)."""
    keys = list(keys)
    tree = KeyTree(keys)
    return {key: tree.canonical(key) for key in keys}


def normalize_state_dict(
    state_dict: Mapping[str, Any], module: torch.nn.Module | None = None
) -> OrderedDict[str, Any]:
    """A new state dict with canonical keys and a matching ``_metadata``; the input is not changed.

    Pass the ``module`` the state dict came from, when at hand, to read its wrappers off the module.

    Raises :class:`KeyCollisionError` when two different values would share a key (the same tensor
    reached through two wrapper paths, as in Fabric's module, is kept once).
    """
    tree = KeyTree(state_dict.keys(), None if module is None else wrapper_paths(module))
    out: OrderedDict[str, Any] = OrderedDict()
    sources: dict[str, list[str]] = defaultdict(list)
    clashes: set[str] = set()
    for key, value in state_dict.items():
        new = tree.canonical(key)
        if new in out and not _same_value(out[new], value):
            clashes.add(new)
        out.setdefault(new, value)
        sources[new].append(key)
    if clashes:
        groups = "\n".join(f"  {new}: {', '.join(sources[new])}" for new in sorted(clashes))
        raise KeyCollisionError(
            "Removing wrapper segments would merge different tensors into one key; "
            f"rename one of them or load without normalising:\n{groups}"
        )
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = _normalize_metadata(metadata, tree)  # type: ignore[attr-defined]
    return out


def submodule_state_dict(state_dict: Mapping[str, Any], submodule: str) -> OrderedDict[str, Any]:
    """The entries under ``submodule`` with that prefix removed (``model.0.weight`` -> ``0.weight``)."""
    prefix = submodule.rstrip(".") + "."
    out: OrderedDict[str, Any] = OrderedDict((k, v) for k, v in state_dict.items() if k.startswith(prefix))
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = OrderedDict(  # type: ignore[attr-defined]
            (k, v) for k, v in metadata.items() if k == prefix[:-1] or k.startswith(prefix)
        )
    consume_prefix_in_state_dict_if_present(out, prefix)
    return out


def submodule_candidates(keys: Iterable[str]) -> list[str]:
    """Module paths that hold tensors, shortest first: what ``--submodule`` may name."""
    paths: set[str] = set()
    for key in keys:
        segments = key.split(".")
        paths.update(".".join(segments[:i]) for i in range(1, len(segments)))
    return sorted(paths, key=lambda p: (p.count("."), p))


def _same_value(a: Any, b: Any) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return (
            a.device == b.device
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.stride() == b.stride()
            and a.data_ptr() == b.data_ptr()
        )
    return False


def _normalize_metadata(metadata: Mapping[str, Any], tree: KeyTree) -> OrderedDict[str, Any]:
    """Module paths made canonical; where a wrapper and its inner module meet, the inner one wins."""
    out: OrderedDict[str, Any] = OrderedDict()
    depth: dict[str, int] = {}
    for path, value in metadata.items():
        new = tree.canonical(path, is_key=False)
        length = path.count(".") + bool(path)
        if new not in out or length > depth[new]:
            out[new] = value
            depth[new] = length
    return out
