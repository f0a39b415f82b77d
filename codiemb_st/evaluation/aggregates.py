"""The one definition of every aggregate score, shared by MTEBEvaluator, the CLI tables and the reproduction.

Names follow mteb's benchmark aggregations (``mteb.benchmarks.benchmark.BenchmarkAggregation``):

- ``mean_task``: the mean of the tasks' main scores (mteb's "Mean (Task)");
- ``mean_task_type``: the mean of the per-type means (mteb's "Mean (TaskType)"); with IR and STS tasks this is the
  IR/STS average the reproduction reports, which weighs both tasks equally however many tasks each has;
- ``<type>_mean``: the mean over the tasks of one type, e.g. ``retrieval_mean``, ``sts_mean``.
"""

from __future__ import annotations

from collections.abc import Mapping
from statistics import fmean

MEAN_TASK = "mean_task"
MEAN_TASK_TYPE = "mean_task_type"


def type_mean_key(task_type: str) -> str:
    """The key of the mean over one task type, e.g. ``"sts_mean"``."""
    return f"{task_type.lower()}_mean"


def aggregate_main_scores(scores: Mapping[str, float], types: Mapping[str, str]) -> dict[str, float]:
    """Per-type means, ``mean_task_type`` and ``mean_task`` of main scores.

    Args:
        scores: ``{task name: main score}``.
        types: ``{task name: task type}`` (``"retrieval"``, ``"sts"``, ...) for every task in ``scores``.

    Returns:
        ``{"<type>_mean": ..., "mean_task_type": ..., "mean_task": ...}`` in that order (empty for no scores).

    Raises:
        ValueError: If a task in ``scores`` has no type.

    Example:
        ::

            aggregate_main_scores({"STSB": 0.8, "ATEC": 0.4, "T2": 0.7}, {"STSB": "sts", "ATEC": "sts", "T2": "retrieval"})
            # {'sts_mean': 0.6, 'retrieval_mean': 0.7, 'mean_task_type': 0.65, 'mean_task': 0.633...}
    """
    missing = [name for name in scores if name not in types]
    if missing:
        raise ValueError(f"No task type given for {missing}.")
    by_type: dict[str, list[float]] = {}
    for name, score in scores.items():
        by_type.setdefault(types[name], []).append(score)
    summary = {type_mean_key(kind): fmean(values) for kind, values in by_type.items()}
    if scores:
        summary[MEAN_TASK_TYPE] = fmean(summary[type_mean_key(kind)] for kind in by_type)
        summary[MEAN_TASK] = fmean(scores.values())
    return summary


def aggregate_keys(types: list[str]) -> list[str]:
    """The aggregate keys for tasks of these types, in report order: per-type means, then the two overall means."""
    return [type_mean_key(kind) for kind in dict.fromkeys(types)] + [MEAN_TASK_TYPE, MEAN_TASK]


AGGREGATE_TITLES = {
    MEAN_TASK: "mean (task)",
    MEAN_TASK_TYPE: "mean (task type)",
}


def aggregate_title(key: str) -> str:
    """A table heading for an aggregate key: ``"mean (task)"``, ``"sts mean"``, ..."""
    return AGGREGATE_TITLES.get(key, key.replace("_", " "))


__all__ = [
    "AGGREGATE_TITLES",
    "MEAN_TASK",
    "MEAN_TASK_TYPE",
    "aggregate_keys",
    "aggregate_main_scores",
    "aggregate_title",
    "type_mean_key",
]
