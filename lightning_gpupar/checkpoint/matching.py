"""Load a state dict into a module by canonical keys, whatever wrappers either side went through.

Both sides are made canonical (:mod:`.keys`). When that is not enough, one attribute prefix is added
or removed, so a checkpoint of the LightningModule (``model.0.weight``) loads into its inner network
(``0.weight``) and the other way round. Anything left unmatched is reported in one readable error.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lightning_gpupar.checkpoint.keys import CheckpointError, KeyTree, normalize_state_dict

_SHOWN = 20  # keys listed per category in an error message


@dataclass(frozen=True)
class LoadReport:
    """What :func:`load_state_dict_flexible` did: checkpoint key -> module key where they differ."""

    mapping: dict[str, str]
    removed_prefix: str = ""
    added_prefix: str = ""
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = [f"{len(self.mapping)} key(s) renamed"]
        if self.removed_prefix:
            parts.append(f"prefix {self.removed_prefix!r} removed")
        if self.added_prefix:
            parts.append(f"prefix {self.added_prefix!r} added")
        if self.missing or self.unexpected:
            parts.append(f"{len(self.missing)} missing and {len(self.unexpected)} unexpected key(s) ignored")
        return ", ".join(parts)


class StateDictMismatchError(CheckpointError, RuntimeError):
    """The checkpoint's tensors do not fit the module (after canonical matching)."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        note: str = "",
    ) -> None:
        self.missing, self.unexpected, self.shapes = missing, unexpected, shapes
        lines = ["The state dict does not fit the module (keys compared without wrapper segments)."]
        if note:
            lines.append(note)
        lines += _listing("Missing from the state dict", missing)
        lines += _listing("Unexpected in the state dict", unexpected)
        lines += _listing(
            "Shape mismatches (key: module expects, state dict has)",
            [f"{key}: {tuple(want)} vs {tuple(got)}" for key, want, got in shapes],
        )
        super().__init__("\n".join(lines))


def remap_state_dict(
    module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> tuple[OrderedDict[str, Any], LoadReport]:
    """``state_dict`` renamed to ``module``'s own keys, ready for ``module.load_state_dict``.

    Raises :class:`StateDictMismatchError` on a shape mismatch, and on missing or unexpected keys
    when ``strict``.
    """
    source = normalize_state_dict(state_dict)
    source_tree = KeyTree(state_dict.keys())
    original = {source_tree.canonical(key): key for key in reversed(list(state_dict.keys()))}
    own = module.state_dict()
    target_tree = KeyTree(own.keys())
    target: dict[str, list[str]] = defaultdict(list)
    for key in own:
        target[target_tree.canonical(key)].append(key)

    removed, added = _best_prefix_change(set(source), set(target))
    out: OrderedDict[str, Any] = OrderedDict()
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []
    hit: set[str] = set()
    for key, value in source.items():
        moved = _move(key, removed, added)
        if moved is None or moved not in target:
            unexpected.append(original[key])
            continue
        hit.add(moved)
        for own_key in target[moved]:
            want = own[own_key]
            if isinstance(value, torch.Tensor) and value.shape != want.shape:
                shapes.append((own_key, tuple(want.shape), tuple(value.shape)))
            out[own_key] = value
            if own_key != original[key]:
                mapping[original[key]] = own_key
    missing = [k for canon, keys in target.items() if canon not in hit for k in keys]

    if shapes or (strict and (missing or unexpected)):
        note = f"Applied: prefix {removed!r} removed." if removed else ""
        note = f"Applied: prefix {added!r} added." if added else note
        raise StateDictMismatchError(missing, unexpected, shapes, note)
    metadata = getattr(state_dict, "_metadata", None)
    if metadata is not None:
        out._metadata = _move_metadata(metadata, source_tree, removed, added, own)  # type: ignore[attr-defined]
    return out, LoadReport(mapping, removed, added, missing, unexpected)


def load_state_dict_flexible(
    module: nn.Module, state_dict: Mapping[str, Any], strict: bool = True
) -> LoadReport:
    """Load ``state_dict`` into ``module`` by canonical keys; returns the mapping applied.

    Either side may be wrapped (DataParallel, DDP, torch.compile, Fabric) at any depth, and the
    state dict may come from the LightningModule or from the network it holds.
    """
    remapped, report = remap_state_dict(module, state_dict, strict=strict)
    module.load_state_dict(remapped, strict=strict)
    return report


def _best_prefix_change(source: set[str], target: set[str]) -> tuple[str, str]:
    """(prefix to remove, prefix to add) that matches the most keys; ("", "") when nothing beats direct."""
    direct = len(source & target)
    if direct == len(source) == len(target):
        return "", ""
    scores: Counter[tuple[str, str]] = Counter()
    for keys, other, add in ((target, source, True), (source, target, False)):
        for key in keys:
            segments = key.split(".")
            for i in range(1, len(segments)):
                if ".".join(segments[i:]) in other:
                    prefix = ".".join(segments[:i]) + "."
                    scores[("", prefix) if add else (prefix, "")] += 1
    if scores:
        change, score = scores.most_common(1)[0]
        if score > direct:
            return change
    return "", ""


def _move(key: str, removed: str, added: str) -> str | None:
    if removed:
        return key[len(removed) :] if key.startswith(removed) else None
    return added + key


def _move_metadata(
    metadata: Mapping[str, Any], tree: KeyTree, removed: str, added: str, own: Mapping[str, Any]
) -> OrderedDict[str, Any]:
    """Source module paths carried to the module's own paths, so version info reaches each module."""
    own_meta = getattr(own, "_metadata", {})
    own_tree = KeyTree(own.keys())
    own_paths: dict[str, list[str]] = defaultdict(list)
    for path in own_meta:
        own_paths[own_tree.canonical(path, is_key=False)].append(path)
    out: OrderedDict[str, Any] = OrderedDict()
    for path, value in metadata.items():
        canon = tree.canonical(path, is_key=False)
        moved = _move(canon + "." if canon else "", removed, added)
        if moved is None:
            continue
        for own_path in own_paths.get(moved.rstrip("."), []):
            out.setdefault(own_path, value)
    return out


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    lines = [f"  {title} ({len(items)}):", *(f"    {item}" for item in items[:_SHOWN])]
    if len(items) > _SHOWN:
        lines.append(f"    ... and {len(items) - _SHOWN} more")
    return lines
