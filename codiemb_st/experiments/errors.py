"""The experiments' one error type for problems the user can fix."""

from __future__ import annotations


class ExperimentError(Exception):
    """A problem the user can fix (missing training file, unfinished source study, unknown set).

    The study scripts print it without a traceback and exit with status 2.
    """


__all__ = ["ExperimentError"]
