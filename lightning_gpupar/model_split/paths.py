"""Submodule paths: the names a placement map uses, ModuleList ranges, and walks of the module tree.

``"model.blocks.0-1"`` names items 0 and 1 of the ``ModuleList`` / ``nn.Sequential`` ``model.blocks``,
written so that Hydra's override grammar accepts it. The root module's path is ``""``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence

from torch import nn

from lightning_gpupar.model_split.errors import PlacementError

_RANGE = re.compile(r"^(\d+)-(\d+)$")


def join(parent: str, name: str) -> str:
    """``join("model", "head") == "model.head"``; the root's path is ``""``."""
    return f"{parent}.{name}" if parent else name


def is_within(path: str, ancestor: str) -> bool:
    """Whether ``path`` is ``ancestor`` or lies below it."""
    return ancestor == "" or path == ancestor or path.startswith(ancestor + ".")


def expand_path(root: nn.Module, key: str) -> list[str]:
    """The submodule paths a placement key names: itself, or each index of a range such as ``blocks.0-5``."""
    parent, _, last = key.rpartition(".")
    match = _RANGE.match(last)
    if match is None:
        find_submodule(root, key)
        return [key]
    start, stop = int(match.group(1)), int(match.group(2))
    container = find_submodule(root, parent)
    names = [name for name, _ in container.named_children()]
    if start > stop:
        raise PlacementError(f"Range {key!r} runs backwards: write {parent}.{stop}-{start}.")
    missing = [str(i) for i in range(start, stop + 1) if str(i) not in names]
    if missing:
        have = f"indices 0-{len(names) - 1}" if names and names[-1] == str(len(names) - 1) else names
        raise PlacementError(
            f"Range {key!r}: {parent or 'the model'} ({type(container).__name__}) has no entry "
            f"{', '.join(missing)}; it has {len(names)} entries ({have})."
        )
    return [join(parent, str(i)) for i in range(start, stop + 1)]


def expand_paths(root: nn.Module, keys: Iterable[str]) -> list[str]:
    """Expand every key (see :func:`expand_path`), keeping their order."""
    return [path for key in keys for path in expand_path(root, str(key))]


def find_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule(path)``, or an error listing what exists there and the closest name."""
    try:
        return root.get_submodule(path)
    except AttributeError:
        pass
    names = [name for name, _ in root.named_modules() if name]
    parts = path.split(".")
    prefix = ""
    for part in parts:  # the deepest existing parent
        candidate = join(prefix, part)
        if candidate not in names:
            break
        prefix = candidate
    siblings = [join(prefix, n) for n, _ in root.get_submodule(prefix).named_children()]
    close = difflib.get_close_matches(path, names, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    where = f"{prefix!r}" if prefix else "the LightningModule"
    raise PlacementError(
        f"No submodule {path!r}.{hint} Submodules of {where}: {', '.join(siblings) or '(none)'}."
    )


def holds_tensors(module: nn.Module, recurse: bool = True) -> bool:
    """Whether the module has parameters or buffers (its own only, with ``recurse=False``)."""
    return any(True for _ in module.parameters(recurse)) or any(True for _ in module.buffers(recurse))


def module_bytes(module: nn.Module, recurse: bool = True) -> tuple[int, int]:
    """(number of parameters, bytes of parameters and buffers); works on the meta device."""
    params = list(module.parameters(recurse))
    tensors = params + list(module.buffers(recurse))
    return sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in tensors)


def is_container(module: nn.Module) -> bool:
    """ModuleList / ModuleDict: holds modules, is never called itself."""
    return isinstance(module, nn.ModuleList | nn.ModuleDict)


def uncovered(root: nn.Module, placed: set[str]) -> list[tuple[str, bool]]:
    """Tensors outside the ``placed`` subtrees, as (path, own_only): the largest uncovered subtrees, and
    the own tensors of ancestors of placed paths."""
    found: list[tuple[str, bool]] = []

    def visit(path: str, module: nn.Module) -> None:
        if path in placed:
            return
        if not any(is_within(p, path) for p in placed):
            if holds_tensors(module):
                found.append((path, False))
            return
        if holds_tensors(module, recurse=False):
            found.append((path, True))
        for name, child in module.named_children():
            visit(join(path, name), child)

    visit("", root)
    return found


def common_ancestor(paths: Sequence[str]) -> str:
    """The longest dotted prefix of all ``paths`` (``""``: the root)."""
    if not paths:
        return ""
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)
