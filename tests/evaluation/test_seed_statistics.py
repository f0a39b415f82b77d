"""The one claim rule: paired by seed, mean difference against its standard deviation."""

from __future__ import annotations

import math

import pytest

from codiemb_st.evaluation.seed_statistics import mean_std, paired_comparison


def test_mean_std():
    assert mean_std([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    assert mean_std([5.0]) == (5.0, None)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
    with pytest.raises(ValueError, match="non-finite"):
        mean_std([1.0, math.nan])


def test_rule_on_constructed_numbers():
    # d = +2, +3, +4: mean 3 > sd 1 -> holds.
    assert paired_comparison({1: 12, 2: 13, 3: 14}, {1: 10, 2: 10, 3: 10}).verdict == "holds"
    # d = +1, -1, +2: mean 0.67 < sd 1.53 -> inconclusive.
    assert paired_comparison({1: 11, 2: 9, 3: 12}, {1: 10, 2: 10, 3: 10}).verdict == "inconclusive"
    # d = -2, -3, -4 -> reversed.
    assert paired_comparison({1: 8, 2: 7, 3: 6}, {1: 10, 2: 10, 3: 10}).verdict == "reversed"
    # The margin: -0.5 pt gaps are "within 1 pt".
    within = paired_comparison({1: 0.795, 2: 0.796}, {1: 0.80, 2: 0.80}, margin=0.01)
    assert within.verdict == "holds" and within.differences == pytest.approx((0.005, 0.006))


def test_pairing_uses_shared_seeds_only():
    result = paired_comparison({1: 1.0, 2: 2.0, 7: 100.0}, {1: 0.0, 2: 0.5, 9: -100.0})
    assert result.seeds == (1, 2) and result.differences == (1.0, 1.5)
    assert paired_comparison({1: 1.0}, {1: 0.0}).verdict == "untestable (1 seed)"
    with pytest.raises(ValueError, match="share no seed"):
        paired_comparison({1: 1.0}, {2: 1.0})
    assert "+1.25 ± 0.35 pts over 2 seed(s) -> holds" in result.describe(scale=1.0)


def test_describe_task_comparison_pairs_per_seed_tables():
    from codiemb_st.evaluation.seed_statistics import describe_task_comparison

    a = {"42": {"SciFact": 0.80, "STS": 0.5}, "43": {"SciFact": 0.81}}
    b = {"42": {"SciFact": 0.77}, "43": {"SciFact": 0.79}, "44": {"SciFact": 0.9}}
    assert describe_task_comparison(a, b, "SciFact") == "+2.50 ± 0.71 pts over 2 seed(s) -> holds"
    assert describe_task_comparison(a, b, "STS") == "no paired seeds"
