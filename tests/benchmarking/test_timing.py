from __future__ import annotations

import pytest

from measurement.timing import interleaved_medians, interleaved_rounds, ratio_summary, round_ratios


def test_ratios_pair_rounds_not_sorted_values():
    # Per-round ratios: a slow round slows both contenders, so pairing by round cancels it.
    baseline = [1.0, 10.0, 2.0]
    values = [0.5, 5.0, 1.0]
    assert round_ratios(values, baseline) == [0.5, 0.5, 0.5]
    assert ratio_summary(values, baseline) == (0.5, 0.5, 0.5)


def test_ratio_summary_is_median_min_max():
    assert ratio_summary([1.0, 3.0, 2.0, 8.0], [1.0, 1.0, 1.0, 2.0]) == (2.5, 1.0, 4.0)


@pytest.mark.parametrize(("values", "baseline"), [([1.0], [1.0, 2.0]), ([], [])])
def test_ratio_series_must_match(values, baseline):
    with pytest.raises(ValueError, match="one length"):
        round_ratios(values, baseline)


def test_interleaved_rounds_alternate_the_steps():
    calls: list[str] = []
    steps = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    result = interleaved_rounds(steps, rounds=3)
    assert calls == ["a", "b"] * 3
    assert {name: len(times) for name, times in result["times"].items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for times in result["cpu_times"].values() for t in times)


def test_interleaved_medians_warm_up_once_then_runs_per_round():
    calls: list[str] = []
    steps = {"a": (lambda: calls.append("a"), 2), "b": (lambda: calls.append("b"), 1)}
    medians = interleaved_medians(steps, rounds=2)
    assert calls == ["a", "b", "a", "a", "b", "a", "a", "b"]
    assert set(medians) == {"a", "b"}
