"""Seed pairing over a study's results, judged by the one claim rule of :mod:`codiemb_st.evaluation.seed_statistics`.

A study's results are ``{label: {seed: evaluation}}`` with ``evaluation["scores"]`` (task -> main score) and
``evaluation["types"]`` (task -> task type); the untrained base has the single pseudo-seed 0.

Example:
    >>> from codiemb_st.experiments.seeds import compare
    >>> results = {
    ...     "a": {1: {"scores": {"S": 0.5}, "types": {"S": "sts"}}, 2: {"scores": {"S": 0.6}, "types": {"S": "sts"}}},
    ...     "b": {1: {"scores": {"S": 0.4}, "types": {"S": "sts"}}, 2: {"scores": {"S": 0.5}, "types": {"S": "sts"}}},
    ... }
    >>> compare(results, "a", "b", ["S"], "sts_mean")
    '+10.00 ± 0.00 pts over 2 seed(s) -> holds'
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from codiemb_st.evaluation.aggregates import MEAN_TASK_TYPE, aggregate_main_scores, type_mean_key
from codiemb_st.evaluation.seed_statistics import RULE, mean_std, paired_comparison

#: The studies' three numbers per model: the IR mean, the STS mean and their average (mteb's "Mean (TaskType)").
IR, STS, OVERALL = type_mean_key("retrieval"), type_mean_key("sts"), MEAN_TASK_TYPE


def means(result: Mapping[str, Any], names: Sequence[str]) -> dict[str, float | None]:
    """The IR mean, STS mean and their average over the named tasks of one evaluation (``None`` where missing)."""
    summary = aggregate_main_scores({n: result["scores"][n] for n in names}, {n: result["types"][n] for n in names})
    return {key: summary.get(key) for key in (IR, STS, OVERALL)}


def per_seed(
    results: Mapping[str, Mapping[int, Mapping[str, Any]]], label: str, names: Sequence[str], key: str
) -> dict[int, float]:
    """``{seed: aggregate}`` of one label over the named tasks (seeds whose aggregate exists)."""
    values = {seed: means(result, names)[key] for seed, result in results.get(label, {}).items()}
    return {seed: value for seed, value in values.items() if value is not None}


def compare(
    results: Mapping[str, Mapping[int, Mapping[str, Any]]],
    a: str,
    b: str,
    names: Sequence[str],
    key: str,
    margin: float = 0.0,
) -> str:
    """Label ``a`` against label ``b`` paired by seed under :data:`RULE` (``"not run"`` when they share no seed)."""
    first, second = per_seed(results, a, names, key), per_seed(results, b, names, key)
    if not first or not second or not set(first) & set(second):
        return "not run"
    return paired_comparison(first, second, margin=margin).describe()


def cell(values: Sequence[float]) -> str:
    """``"81.23 ± 0.40"``: mean ± sample std of fraction scores, x100 (no spread for one value)."""
    mean, std = mean_std(values)
    return f"{mean * 100:.2f}" + ("" if std is None else f" ± {std * 100:.2f}")


def paired_record(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any]:
    """The JSON record of a paired comparison: seeds, differences, mean, std, verdict and its one-line text."""
    outcome = paired_comparison(a, b)
    return {
        "seeds": list(outcome.seeds),
        "differences": list(outcome.differences),
        "mean": outcome.mean,
        "std": outcome.std,
        "verdict": outcome.verdict,
        "text": outcome.describe(),
    }


__all__ = ["IR", "OVERALL", "RULE", "STS", "cell", "compare", "means", "paired_record", "per_seed"]
