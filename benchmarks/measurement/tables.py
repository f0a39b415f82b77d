"""Markdown tables of benchmark rows: rows, ratio cells and target verdicts.

Example:
    >>> from measurement.tables import markdown_row, target_verdict
    >>> markdown_row(["ours", "1.02x", target_verdict(1.02, 1.05)])
    '| ours | 1.02x | <= 1.05x: met |'
"""

from __future__ import annotations

from collections.abc import Sequence


def markdown_row(cells: Sequence[object]) -> str:
    """One markdown table row: ``| a | b |``."""
    return "| " + " | ".join(str(cell) for cell in cells) + " |"


def markdown_header(headers: Sequence[str], align: str = "---") -> list[str]:
    """The header row and the separator row (``align`` per column, e.g. ``---:`` for right-aligned)."""
    return [markdown_row(headers), "|" + f"{align}|" * len(headers)]


def ratio_cell(value: float, baseline: float | None, digits: int = 2) -> str:
    """``value / baseline`` as ``1.23x``, or ``n/a`` when there is no (or a zero) baseline."""
    if not baseline:
        return "n/a"
    return f"{value / baseline:.{digits}f}x"


def is_met(value: float, target: float) -> bool:
    """Whether a ratio meets an upper-bound target (``value <= target``)."""
    return value <= target


def target_verdict(value: float, target: float, label: str = "", not_met: str = "not met") -> str:
    """``"[label ]<= 1.05x: met"`` or ``"... : not met"`` (``not_met`` words the failure)."""
    prefix = f"{label} " if label else ""
    return f"{prefix}<= {target}x: {'met' if is_met(value, target) else not_met}"
