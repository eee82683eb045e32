"""Benchmark results: each script's rows go to results/NAME.csv with the machine line, plus a chart."""

from __future__ import annotations

import csv
from collections.abc import Callable
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


def test_rounds_alternate_their_order_and_ratios_pair_within_a_round() -> None:
    calls: list[str] = []
    slow_down = iter([1.0, 1.0, 3.0, 3.0, 2.0, 2.0])  # the machine's speed drifts from round to round

    def variant(name: str, cost: float) -> Callable[[], list[float]]:
        def measure() -> list[float]:
            calls.append(name)
            factor = next(slow_down)
            return [cost * factor, cost * factor * 5, cost * factor]  # median: cost * factor

        return measure

    per_round = common.interleaved({"a": variant("a", 1.0), "b": variant("b", 1.1)}, rounds=3)
    assert calls == ["a", "b", "b", "a", "a", "b"]
    assert per_round["a"] == [1.0, 3.0, 2.0]
    assert per_round["b"] == pytest.approx([1.1, 3.3, 2.2])
    assert common.paired_ratio(per_round, "b", "a") == pytest.approx([1.1, 1.1, 1.1])


def test_a_ratio_is_the_median_of_its_rounds_with_their_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    per_round = {"base": [1.0, 1.0, 1.0], "new": [0.9, 1.2, 1.05]}
    common.report("t", per_round, {"new / base": ("new", "base")}, name="rounds")
    rows = list(csv.reader((tmp_path / "rounds.csv").read_text().splitlines()[2:]))
    assert ["ratio", "new / base", "1.0500"] in rows
    assert ["ratio lowest round", "new / base", "0.9"] in rows
    assert ["ratio highest round", "new / base", "1.2"] in rows
    assert "(3 rounds: 0.900 .. 1.200)" in capsys.readouterr().out
