"""Reports of evaluation results: Markdown score and geometry tables, and a grouped bar chart.

Used by ``codiemb-st eval`` and by the reproduction script, so both tables aggregate the same way
(:mod:`codiemb_st.evaluation.aggregates`) and mark corpus subsamples the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codiemb_st.evaluation.aggregates import aggregate_keys, aggregate_main_scores, aggregate_title
from codiemb_st.file_io import write_atomic

logger = logging.getLogger(__name__)

SUBSAMPLE_MARK = " †"

GEOMETRY_ROWS = {
    "anisotropy": "anisotropy (mean cosine, lower = more isotropic)",
    "effective_rank": "effective rank (higher = richer)",
    "svd_entropy": "SVD entropy (nats)",
    "condition_number": "condition number (lower = better conditioned; inf = rank-deficient)",
    "numerical_rank": "numerical rank (of the embedding dimension)",
    "uniformity": "uniformity (lower = more uniform)",
    "alignment": "alignment (lower = positives closer)",
}


@dataclass(frozen=True)
class ReportRow:
    """One task of a score table.

    Args:
        name: The task name (the key into the scores).
        type: ``"retrieval"``, ``"sts"``, ...
        split: The evaluated split ("" to leave the column out of the row).
        metric: The main metric's name.
        mark: Appended to the name, e.g. ``" †"`` for a corpus subsample.
    """

    name: str
    type: str
    split: str = ""
    metric: str = ""
    mark: str = ""


def format_score(value: float | None, scale: float = 100.0) -> str:
    """``82.03`` for 0.8203 (x100, two decimals); ``n/a`` for a missing score."""
    return "n/a" if value is None else f"{value * scale:.2f}"


def score_table(
    rows: Sequence[ReportRow],
    scores: Mapping[str, Mapping[str, float]],
    *,
    missing: Sequence[str] = (),
    with_split_and_metric: bool = True,
) -> list[str]:
    """Markdown lines: one row per task, one column per model, then the aggregate rows.

    Args:
        rows: The tasks, in table order.
        scores: ``{model label: {task name: main score}}``; every model must have every task of ``rows``.
        missing: Tasks that could not be evaluated, listed as ``n/a`` rows (marked ‡).
        with_split_and_metric: Include the Type/Split/Metric columns.

    Returns:
        The table's lines (no trailing blank line).
    """
    labels = list(scores)
    prefix_heads = ["Task", "Type", "Split", "Metric"] if with_split_and_metric else ["Task"]
    lines = [
        "| " + " | ".join(prefix_heads + labels) + " |",
        "|" + "---|" * len(prefix_heads) + "---:|" * len(labels),
    ]

    def line(title: str, cells: list[str], extra: list[str]) -> str:
        head = [title, *extra] if with_split_and_metric else [title]
        return "| " + " | ".join(head + cells) + " |"

    for row in rows:
        cells = [format_score(scores[label][row.name]) for label in labels]
        lines.append(line(f"{row.name}{row.mark}", cells, [row.type, row.split, row.metric]))
    for name in missing:
        lines.append(line(f"{name} ‡", ["n/a"] * len(labels), ["", "", ""]))
    types = {row.name: row.type for row in rows}
    summaries = {
        label: aggregate_main_scores({row.name: scores[label][row.name] for row in rows}, types) for label in labels
    }
    for key in aggregate_keys([row.type for row in rows]) if rows else []:
        cells = [f"**{format_score(summaries[label].get(key))}**" for label in labels]
        lines.append(line(f"**{aggregate_title(key)}**", cells, ["", "", ""]))
    return lines


def geometry_table(geometry: Mapping[str, Mapping[str, float | None]], title: str = "Geometry") -> list[str]:
    """Markdown lines: one row per geometry metric every model has, one column per model (``inf`` for None)."""
    labels = list(geometry)
    if not labels:
        return []
    lines = ["| " + title + " | " + " | ".join(labels) + " |", "|---|" + "---:|" * len(labels)]
    for key, name in GEOMETRY_ROWS.items():
        if all(key in geometry[label] for label in labels):
            cells = ["inf" if geometry[label][key] is None else f"{geometry[label][key]:.4g}" for label in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def bar_chart(
    path: str | Path, task_names: Sequence[str], scores: Mapping[str, Mapping[str, float]], title: str
) -> bool:
    """A grouped bar chart (one group per task, one bar per model, scores x100) written atomically as PNG.

    Args:
        path: The PNG file.
        task_names: The tasks, in order (names as keys of ``scores``; a trailing mark such as " †" is shown).
        scores: ``{model label: {task name: main score}}``.
        title: The chart's title.

    Returns:
        ``False`` (with a warning) when matplotlib is not installed, else ``True``.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no bar chart (pip install matplotlib).")
        return False
    labels = list(scores)
    keys = [name.removesuffix(SUBSAMPLE_MARK) for name in task_names]
    width = 0.8 / max(1, len(labels))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(keys) * max(1, len(labels)) ** 0.5 + 2), 4.5))
    for i, label in enumerate(labels):
        values = [scores[label][key] * 100 for key in keys]
        positions = [x + (i - (len(labels) - 1) / 2) * width for x in range(len(keys))]
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks(range(len(keys)), list(task_names), rotation=30, ha="right")
    ax.set_ylabel("main score x100 (nDCG@10 / cosine Spearman)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)
    return True


def markdown_report(
    tasks: Sequence[Any],
    skipped: dict[str, str],
    results: dict[str, dict[str, Any]],
    geometry: dict[str, dict[str, float]],
) -> str:
    """The Markdown report of ``codiemb-st eval``: the score table with aggregates, notes on corpus subsamples and
    skipped tasks, and the geometry table.

    Args:
        tasks: The prepared tasks (:func:`codiemb_st.evaluation.prepare_task`), in table order.
        skipped: Task name -> why it was not evaluated.
        results: Model label -> ``{"scores": {task name: TaskScore}}``.
        geometry: Model label -> geometry metrics (may be empty).
    """
    rows = [
        ReportRow(
            name=task.name,
            type=task.type,
            split=task.split,
            metric=task.task.metadata.main_score,
            mark=SUBSAMPLE_MARK if task.corpus_subsample is not None else "",
        )
        for task in tasks
    ]
    scores = {label: {name: s.main_score for name, s in result["scores"].items()} for label, result in results.items()}
    lines = score_table(rows, scores, missing=list(skipped))
    lines += ["", "Main scores x100 (mteb's own metric code, no result cache)."]
    for task in tasks:
        info = task.corpus_subsample
        if info is not None:
            lines.append(
                f"† {task.name}: corpus subsampled to {info.documents_kept:,} of {info.documents_total:,} passages "
                f"(all {info.judged_documents:,} judged passages kept, seed {info.seed}); scores are optimistic vs. "
                "the full corpus and comparable only between runs with the same subsample."
            )
    for name, reason in skipped.items():
        lines.append(f"‡ {name}: not evaluated ({reason}).")
    if geometry:
        lines += ["", *geometry_table(geometry)]
    return "\n".join(lines) + "\n"


__all__ = [
    "GEOMETRY_ROWS",
    "ReportRow",
    "SUBSAMPLE_MARK",
    "bar_chart",
    "format_score",
    "geometry_table",
    "markdown_report",
    "score_table",
]
