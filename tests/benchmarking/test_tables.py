from __future__ import annotations

from measurement.tables import markdown_header, markdown_row, ratio_cell, target_verdict


def test_markdown_row_and_header():
    assert markdown_row(["fp32", 1, "", 2.5]) == "| fp32 | 1 |  | 2.5 |"
    assert markdown_header(["a", "b", "c"]) == ["| a | b | c |", "|---|---|---|"]
    assert markdown_header(["a", "b"], align="---:")[1] == "|---:|---:|"


def test_ratio_cell_without_a_baseline_is_not_a_number():
    assert ratio_cell(3.0, 2.0) == "1.50x"
    assert ratio_cell(3.0, None) == "n/a"
    assert ratio_cell(3.0, 0.0) == "n/a"


def test_target_verdict_is_an_upper_bound():
    assert target_verdict(1.05, 1.05) == "<= 1.05x: met"
    assert target_verdict(1.06, 1.05) == "<= 1.05x: not met"
    assert target_verdict(0.9, 0.85, "time", not_met="NOT met") == "time <= 0.85x: NOT met"
