"""The README and docs/ pages: every relative link resolves, and every ``make`` target, console script
and Hydra config choice a page names exists."""

from __future__ import annotations

import re
from importlib.metadata import distribution
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
MAKE = re.compile(r"(?<![\w-])make ([a-z][a-z-]*)")
SCRIPT = re.compile(r"\bgpupar-[a-z]+\b")
CHOICE = re.compile(r"(?<![\w.+])(strategy|model|data|trainer)=([a-z_][a-z0-9_]*)\b")
#: Names a page mentions on purpose although they do not exist (a refused input, shown as such).
NOT_THERE = {("strategy", "nonexistent"), ("strategy", "split")}


def _page_ids() -> list[str]:
    return [str(page.relative_to(ROOT)) for page in PAGES]


def _make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z-]*):", text, flags=re.MULTILINE))


def _scripts() -> set[str]:
    entry_points = distribution("lightning-gpupar").entry_points
    return {entry.name for entry in entry_points if entry.group == "console_scripts"}


def test_the_readme_is_short_and_links_every_page() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert len(PAGES) >= 9
    linked = {(ROOT / target).resolve() for target in LINK.findall(readme)}
    assert {page.resolve() for page in PAGES[1:]} <= linked


@pytest.mark.parametrize("page", PAGES, ids=_page_ids())
def test_relative_links_resolve(page: Path) -> None:
    targets = [t.split("#")[0] for t in LINK.findall(page.read_text()) if not re.match(r"[a-z]+:|#", t)]
    missing = [t for t in targets if t and not (page.parent / t).exists()]
    assert missing == []


@pytest.mark.parametrize("page", PAGES, ids=_page_ids())
def test_named_make_targets_scripts_and_config_choices_exist(page: Path) -> None:
    text = page.read_text()
    assert set(MAKE.findall(text)) - _make_targets() == set()
    assert set(SCRIPT.findall(text)) - _scripts() == set()
    unknown = {
        f"{group}={name}"
        for group, name in CHOICE.findall(text)
        if (group, name) not in NOT_THERE and not (ROOT / "conf" / group / f"{name}.yaml").exists()
    }
    assert unknown == set()


def test_the_checks_find_what_is_missing(tmp_path: Path) -> None:
    text = "[x](nowhere.md) `make nosuchtarget` gpupar-nosuch strategy=nosuch"
    assert LINK.findall(text) == ["nowhere.md"] and not (ROOT / "nowhere.md").exists()
    assert MAKE.findall(text) == ["nosuchtarget"] and "nosuchtarget" not in _make_targets()
    assert SCRIPT.findall(text) == ["gpupar-nosuch"] and "gpupar-nosuch" not in _scripts()
    assert CHOICE.findall(text) == [("strategy", "nosuch")]
