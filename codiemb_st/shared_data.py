"""Where scripts and the command line find the project's shared data folder (``shared/data``), if there is one.

The package never needs it: it only supplies defaults (``codiemb-st eval`` with no ``--data-dir``, the
reproduction's training files). Looked up, in order: the ``CODIEMB_SHARED_DATA`` environment variable, then a
``shared/data`` folder in the current folder or any of its parents, then next to the package's source checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARIABLE = "CODIEMB_SHARED_DATA"


def find_shared_data() -> Path | None:
    """The ``shared/data`` folder (holding ``eval/`` and/or ``train/``), or ``None`` when there is none.

    Example:
        ::

            data = find_shared_data()
            eval_dir = data / "eval" if data else None
    """
    explicit = os.environ.get(ENV_VARIABLE)
    if explicit:
        return Path(explicit)
    starts = [Path.cwd().resolve(), Path(__file__).resolve().parent]
    for start in starts:
        for folder in (start, *start.parents):
            candidate = folder / "shared" / "data"
            if (candidate / "eval").is_dir() or (candidate / "train").is_dir():
                return candidate
    return None


def shared_data_path(*parts: str) -> Path | None:
    """A path inside the shared data folder (e.g. ``shared_data_path("eval")``), or ``None`` without one."""
    root = find_shared_data()
    return root.joinpath(*parts) if root is not None else None


__all__ = ["ENV_VARIABLE", "find_shared_data", "shared_data_path"]
