"""Every test that needs CUDA carries the ``cuda`` marker, so ``make gpu-check`` (``pytest -m cuda``) runs it.

A test needs CUDA when a mark on it (its decorators, its class's, the module's ``pytestmark``, or the
``marks=`` of one of its ``pytest.param``) is ``requires_cuda`` or a ``skipif`` whose condition names CUDA
(``torch.cuda.is_available()``, ``device_count() < 2``). Read from the source (``ast``): no import, fast.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

TESTS = Path(__file__).resolve().parent


def _needs_cuda(node: ast.AST, names: dict[str, ast.AST]) -> bool:
    """Whether the mark expression ``node`` skips without CUDA (and runs with it)."""
    if _is_parametrize(node):
        return False  # its pytest.param marks are checked one by one
    for sub in ast.walk(node):
        if isinstance(sub, ast.Name) and sub.id == "requires_cuda":
            return True
        if isinstance(sub, ast.Name) and sub.id in names and _needs_cuda(names[sub.id], {}):
            return True
        skipif = isinstance(sub, ast.Call) and getattr(sub.func, "attr", None) == "skipif" and sub.args
        if skipif and _skips_without_cuda(ast.unparse(sub.args[0])):  # type: ignore[attr-defined]
            return True
    return False


def _skips_without_cuda(condition: str) -> bool:
    """Whether a ``skipif`` condition naming CUDA holds on a machine without GPUs but not on one with
    eight (``skipif(torch.cuda.is_available())`` is a test for machines *without* CUDA)."""
    if "cuda" not in condition:
        return False
    skipped = []
    for gpus in (0, 8):
        cuda = SimpleNamespace(is_available=lambda g=gpus: g > 0, device_count=lambda g=gpus: g)
        try:
            skipped.append(bool(eval(condition, {"torch": SimpleNamespace(cuda=cuda)})))
        except Exception:
            return True  # a condition this cannot evaluate: it names CUDA, so it asks for the marker
    return skipped == [True, False]


def _is_parametrize(node: ast.AST) -> bool:
    return isinstance(node, ast.Call) and ast.unparse(node.func).endswith("mark.parametrize")


def _is_cuda_marker(node: ast.AST) -> bool:
    return any(
        isinstance(sub, ast.Attribute) and sub.attr == "cuda" and ast.unparse(sub.value) == "pytest.mark"
        for sub in ast.walk(node)
    )


def _marks(node: ast.AST) -> list[ast.AST]:
    """The mark expressions in a decorator list, a ``pytestmark`` value (list or one) or ``marks=``."""
    return list(node.elts) if isinstance(node, ast.List | ast.Tuple) else [node]


def _params(decorator: ast.AST) -> Iterator[ast.Call]:
    for sub in ast.walk(decorator):
        if isinstance(sub, ast.Call) and ast.unparse(sub.func) == "pytest.param":
            yield sub


def violations(path: Path) -> list[str]:
    """``path::test`` for each test that needs CUDA but lacks the ``cuda`` marker."""
    tree = ast.parse(path.read_text())
    names: dict[str, ast.AST] = {}
    module_marks: list[ast.AST] = []
    for statement in tree.body:
        if isinstance(statement, ast.Assign):
            for target in statement.targets:
                if isinstance(target, ast.Name):
                    names[target.id] = statement.value
                    if target.id == "pytestmark":
                        module_marks = _marks(statement.value)
    found = []

    def check(function: ast.FunctionDef, inherited: list[ast.AST]) -> None:
        marks = [*inherited, *function.decorator_list]
        marked = any(_is_cuda_marker(m) for m in marks)
        if any(_needs_cuda(m, names) for m in marks) and not marked:
            found.append(f"{path.relative_to(TESTS.parent)}::{function.name}")
            return
        for decorator in function.decorator_list:
            for param in _params(decorator):
                for keyword in param.keywords:
                    if keyword.arg != "marks":
                        continue
                    needs = _needs_cuda(keyword.value, names)
                    if needs and not marked and not _is_cuda_marker(keyword.value):
                        found.append(
                            f"{path.relative_to(TESTS.parent)}::{function.name}[{ast.unparse(param)}]"
                        )

    for statement in tree.body:
        if isinstance(statement, ast.FunctionDef) and statement.name.startswith("test"):
            check(statement, module_marks)
        if isinstance(statement, ast.ClassDef):
            for item in statement.body:
                if isinstance(item, ast.FunctionDef) and item.name.startswith("test"):
                    check(item, [*module_marks, *statement.decorator_list])
    return found


def test_every_test_that_needs_cuda_has_the_cuda_marker() -> None:
    found = [v for path in sorted(TESTS.rglob("test_*.py")) for v in violations(path)]
    assert not found, (
        "these tests skip without CUDA but lack @pytest.mark.cuda, so `pytest -m cuda` (make gpu-check) "
        "never runs them; add the marker (on the pytest.param when only some parameters need CUDA):\n"
        + "\n".join(found)
    )


def test_the_check_sees_each_way_of_needing_cuda(tmp_path: Path) -> None:
    source = """
import pytest, torch
from tests.helpers.markers import requires_cuda
TWO = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="two")

@requires_cuda
def test_plain(): ...

@pytest.mark.cuda
@requires_cuda
def test_marked(): ...

@pytest.mark.skipif(not torch.cuda.is_available(), reason="gpu")
def test_skipif(): ...

@pytest.mark.skipif(torch.cuda.is_available(), reason="a test for machines without CUDA")
def test_without_cuda(): ...

@pytest.mark.parametrize("d", ["cpu", pytest.param("cuda:1", marks=TWO)])
def test_param(d): ...

@pytest.mark.parametrize("d", ["cpu", pytest.param("cuda:1", marks=[pytest.mark.cuda, TWO])])
def test_param_marked(d): ...

def test_cpu(): ...
"""
    path = TESTS / "_cuda_marker_probe_test.py"  # inside tests/, as the real ones are
    try:
        path.write_text(source)
        names = [v.split("::")[1] for v in violations(path)]
    finally:
        path.unlink()
    assert names == ["test_plain", "test_skipif", "test_param[pytest.param('cuda:1', marks=TWO)]"]
