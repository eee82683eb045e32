"""Benchmark results: each script's rows go to results/NAME.csv with the machine line, plus a chart."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from benchmarks import common


def test_results_are_written_as_csv_with_the_machine_and_a_chart(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path / "results")
    medians = {"unsplit": 0.100, "split": 0.103}
    common.report("a title", medians, {"split / unsplit (target <= 1.03)": ("split", "unsplit")}, name="demo")
    text = (tmp_path / "results" / "demo.csv").read_text().splitlines()
    assert text[0] == "# a title" and text[1] == f"# machine: {common.machine()}"
    rows = list(csv.reader(text[2:]))
    assert rows[0] == ["kind", "name", "value"]
    assert ["ms/step", "split", "103.0"] in rows
    assert ["ratio", "split / unsplit (target <= 1.03)", "1.0300"] in rows
    pytest.importorskip("matplotlib")
    assert (tmp_path / "results" / "demo.png").read_bytes()[:4] == b"\x89PNG"


def test_targets_are_read_from_the_ratio_names() -> None:
    assert common.target_of("split / unsplit (target <= 1.03)") == ("<=", 1.03)
    assert common.target_of("ours / Lightning ddp (target >= 0.97)") == (">=", 0.97)
    assert common.target_of("chunks=4 / chunks=1") is None
