"""The package's shape: layers that import only downwards, no import cycle, one error base.

The import graph is read from the source (``ast``), so a lazy import inside a function counts like one at
the top; only imports under ``if TYPE_CHECKING:`` are left out (they never run).
"""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Iterator
from pathlib import Path

import pytest

import lightning_gpupar
from lightning_gpupar import GpuparError

PACKAGE = Path(lightning_gpupar.__file__).parent
#: Engines below the Lightning-facing layer: they never import strategies/, config/, cli/ or the root.
LOWER = ("dp", "model_split", "checkpoint", "devices", "ddp")
UPPER = ("strategies", "config", "cli")


def _module_name(path: Path) -> str:
    parts = ("lightning_gpupar", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _runtime_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []  # type-only imports never run
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node


def _imports(name: str) -> set[str]:
    """The package modules ``name`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    tree = ast.parse(MODULES[name].read_text())
    found: set[str] = set()
    for node in _runtime_imports(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name in MODULES}
        elif node.module in MODULES and node.level == 0:
            subs = {f"{node.module}.{alias.name}" for alias in node.names}
            found |= (subs & MODULES.keys()) or {node.module}
            if subs - MODULES.keys():
                found.add(node.module)
    return found - {name}


GRAPH = {name: _imports(name) for name in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while (top := stack.pop()) != node:
                component.append(top)
            component.append(node)
            if len(component) > 1:
                found.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    return found


def _layer(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "<root>"


def test_the_graph_is_read() -> None:
    assert "lightning_gpupar.devices.requests" in GRAPH["lightning_gpupar.config.trainer"] or GRAPH[
        "lightning_gpupar.config.trainer"
    ] & {"lightning_gpupar.devices"}
    assert "lightning_gpupar.dp.batch" in GRAPH["lightning_gpupar.strategies.dp"]


def test_no_import_cycle() -> None:
    assert _cycles() == []


def test_a_cycle_would_be_found(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(GRAPH, "lightning_gpupar.dp.batch", {"lightning_gpupar.strategies.dp"})
    wanted = {"lightning_gpupar.dp.batch", "lightning_gpupar.strategies.dp"}  # maybe via dp.gather
    assert any(wanted <= set(cycle) for cycle in _cycles())


@pytest.mark.parametrize("layer", LOWER)
def test_lower_layers_never_import_upwards(layer: str) -> None:
    upward = {
        f"{name} -> {target}"
        for name, targets in GRAPH.items()
        if _layer(name) == layer
        for target in targets
        if _layer(target) in (*UPPER, "<root>")
    }
    assert upward == set()


def test_the_root_holds_few_modules_and_the_layers_are_packages() -> None:
    root_modules = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py"]
    assert len(root_modules) <= 3, root_modules
    packages = {p.parent.name for p in PACKAGE.glob("*/__init__.py")}
    assert {*LOWER, *UPPER} <= packages


def _exception_classes() -> Iterator[type[BaseException]]:
    for info in pkgutil.walk_packages(lightning_gpupar.__path__, "lightning_gpupar."):
        module = importlib.import_module(info.name)
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if issubclass(cls, BaseException) and cls.__module__.startswith("lightning_gpupar"):
                yield cls


def test_every_exception_class_derives_from_gpupar_error() -> None:
    classes = set(_exception_classes())
    assert len(classes) >= 15
    assert {cls.__qualname__ for cls in classes if not issubclass(cls, GpuparError)} == set()
    assert issubclass(lightning_gpupar.devices.DeviceSelectionError, ValueError)  # builtin bases kept


def test_module_docstrings_say_the_job_in_about_ten_lines() -> None:
    """Long explanations live in docs/ (docs/internals.md), not at the top of a module."""
    lengths = {
        name: len((ast.get_docstring(ast.parse(path.read_text()), clean=False) or "").strip().splitlines())
        for name, path in MODULES.items()
    }
    assert {name: n for name, n in lengths.items() if n > 11} == {}
    assert max(lengths.values()) >= 3  # docstrings are read at all
