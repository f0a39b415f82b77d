"""The command line's one error type for problems the user can fix."""

from __future__ import annotations


class UsageError(Exception):
    """A problem the user can fix (missing data, unknown task, bad option): printed without a traceback, exit 2."""


__all__ = ["UsageError"]
