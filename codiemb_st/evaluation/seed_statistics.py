"""Claims over several seeds: mean ± standard deviation, and one rule for paired comparisons.

A comparison of two kinds of run ("CoDiEmb vs naive co-training") pairs the runs by seed: run a with seed s against
run b with the same seed s (same data order, same initial shuffles), so seed-to-seed noise that both share cancels.

**The rule** (applied to every claim, on dev and on test): with the per-seed differences d_s = a_s − b_s + margin
over the n seeds both runs have, the claim *holds* when mean(d) > sd(d) (sample standard deviation, n − 1), is
*reversed* when mean(d) < −sd(d), and is *inconclusive* otherwise; with one seed it is *untestable*. ``margin`` turns
"a beats b" (margin 0) into "a is within m of b" (margin m).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from statistics import fmean, stdev

RULE = (
    "paired by seed: with d_s = a_s - b_s (+ margin) over the seeds both runs have, a claim holds when mean(d) > "
    "sd(d) (sample standard deviation), is reversed when mean(d) < -sd(d), is inconclusive otherwise, and is "
    "untestable with one seed"
)


def mean_std(values: Iterable[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (``None`` for a single value).

    Raises:
        ValueError: If there are no values or a value is not finite.
    """
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value.")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"mean_std got a non-finite value: {values}.")
    return fmean(values), (stdev(values) if len(values) > 1 else None)


@dataclass(frozen=True)
class PairedComparison:
    """The outcome of :func:`paired_comparison`.

    Args:
        seeds: The seeds both runs have, in order.
        differences: d_s = a_s − b_s + margin per seed.
        mean: mean(d).
        std: sd(d), ``None`` for one seed.
        margin: The margin added to every difference.
        verdict: ``"holds"``, ``"reversed"``, ``"inconclusive"`` or ``"untestable (1 seed)"``.
    """

    seeds: tuple[int, ...]
    differences: tuple[float, ...]
    mean: float
    std: float | None
    margin: float
    verdict: str

    def describe(self, scale: float = 100.0) -> str:
        """``"+1.23 ± 0.40 pts over 3 seeds -> holds"`` (differences x ``scale``, the margin included)."""
        spread = "" if self.std is None else f" ± {self.std * scale:.2f}"
        margin = f" (margin {self.margin * scale:+.2f} included)" if self.margin else ""
        return f"{self.mean * scale:+.2f}{spread} pts over {len(self.seeds)} seed(s){margin} -> {self.verdict}"


def paired_comparison(a: Mapping[int, float], b: Mapping[int, float], *, margin: float = 0.0) -> PairedComparison:
    """Compare run a with run b seed by seed with :data:`RULE`.

    Args:
        a: ``{seed: score}`` of run a.
        b: ``{seed: score}`` of run b.
        margin: Added to every difference (``0.01`` tests "a is at most 1 point below b" on fraction scores).

    Raises:
        ValueError: If the runs share no seed.

    Example:
        ::

            paired_comparison({42: 0.80, 43: 0.81}, {42: 0.77, 43: 0.79}).verdict  # 'holds'
    """
    seeds = tuple(sorted(set(a) & set(b)))
    if not seeds:
        raise ValueError(f"The runs share no seed (a: {sorted(a)}, b: {sorted(b)}): nothing to pair.")
    differences = tuple(float(a[s]) - float(b[s]) + margin for s in seeds)
    mean, std = mean_std(differences)
    if std is None:
        verdict = "untestable (1 seed)"
    elif mean > std:
        verdict = "holds"
    elif mean < -std:
        verdict = "reversed"
    else:
        verdict = "inconclusive"
    return PairedComparison(seeds, differences, mean, std, margin, verdict)


def describe_task_comparison(
    a: Mapping[str | int, Mapping[str, float]], b: Mapping[str | int, Mapping[str, float]], task: str
) -> str:
    """:func:`paired_comparison` of one task between two runs' per-seed score tables, described in one line.

    Args:
        a: ``{seed: {task: score}}`` of run a (seeds as JSON keys or ints), as a study's ``results.json`` keeps them.
        b: The same for run b.
        task: The task to compare.

    Returns:
        :meth:`PairedComparison.describe`, or ``"no paired seeds"`` when no seed has the task in both runs.

    Example:
        ::

            describe_task_comparison({"42": {"SciFact": 0.76}}, {"42": {"SciFact": 0.75}}, "SciFact")
    """
    left = {int(seed): scores[task] for seed, scores in a.items() if task in scores}
    right = {int(seed): scores[task] for seed, scores in b.items() if task in scores}
    if not set(left) & set(right):
        return "no paired seeds"
    return paired_comparison(left, right).describe()


__all__ = ["RULE", "PairedComparison", "describe_task_comparison", "mean_std", "paired_comparison"]
