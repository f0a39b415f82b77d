"""Where this repository's scripts and tests find the project's shared data folder (``shared/data``).

For the checkout only: the library and the ``codiemb-st`` command never call it (they use exactly the files and
folders they are given). ``benchmarks/`` scripts use it for their documented defaults. Looked up, in order: the
``CODIEMB_SHARED_DATA`` environment variable, then ``shared/data`` inside the source checkout this module belongs to
or in one of the checkout's two parent folders (``../shared/data``; a git worktree may sit one level deeper). The
current folder is never searched, and neither is an installed package's location (site-packages has no
``pyproject.toml`` beside it).
"""

from __future__ import annotations

import os
from pathlib import Path

ENV_VARIABLE = "CODIEMB_SHARED_DATA"

#: The source checkout holding this module, recognised by its pyproject.toml (None for an installed package).
_CHECKOUT = Path(__file__).resolve().parents[1]


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
    if not (_CHECKOUT / "pyproject.toml").is_file():
        return None
    for folder in (_CHECKOUT, *_CHECKOUT.parents[:2]):
        candidate = folder / "shared" / "data"
        if (candidate / "eval").is_dir() or (candidate / "train").is_dir():
            return candidate
    return None


def shared_data_path(*parts: str) -> Path | None:
    """A path inside the shared data folder (e.g. ``shared_data_path("eval")``), or ``None`` without one."""
    root = find_shared_data()
    return root.joinpath(*parts) if root is not None else None


__all__ = ["ENV_VARIABLE", "find_shared_data", "shared_data_path"]
