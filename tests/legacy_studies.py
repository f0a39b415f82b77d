"""The study scripts as they were before codiemb_st.experiments and benchmarks/studies/ (commit ``LEGACY_COMMIT``, when
each was one self-contained script), loaded from git.

Tests compare the new result store with the functions that wrote the committed results and caches, so the old
values are computed by the old code, never hard-coded.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

#: A landed commit with the self-contained scripts (benchmarks/reproduce_codiemb.py 942 lines, fusion_study.py 756;
#: the last one before the move, e6fc55a, only added issue 25's method rows to the fusion study's grid).
LEGACY_COMMIT = "e4850ff3b185f728b368465a62822abcc5ccf245"
ROOT = Path(__file__).resolve().parents[1]


def load_legacy_script(name: str, folder: Path) -> ModuleType:
    """``benchmarks/<name>.py`` at :data:`LEGACY_COMMIT`, written into ``folder`` and imported as ``legacy_<name>``."""
    _ensure_legacy_commit()
    source = subprocess.run(
        ["git", "show", f"{LEGACY_COMMIT}:benchmarks/{name}.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    path = folder / f"legacy_{name}.py"
    path.write_text(source, encoding="utf-8")
    return load_script(path, f"legacy_{name}")


def _ensure_legacy_commit() -> None:
    """Fetch :data:`LEGACY_COMMIT` when the checkout lacks it (a shallow clone), or say what to do."""

    def present() -> bool:
        return subprocess.run(["git", "cat-file", "-e", f"{LEGACY_COMMIT}^{{commit}}"], cwd=ROOT).returncode == 0

    if present():
        return
    subprocess.run(["git", "fetch", "--quiet", "origin", LEGACY_COMMIT], cwd=ROOT, capture_output=True)
    if not present():
        raise RuntimeError(
            f"These tests read the pre-experiments scripts from git commit {LEGACY_COMMIT}, which this checkout "
            "lacks: clone with full history (or run `git fetch --unshallow`)."
        )


def load_script(path: Path, module_name: str) -> ModuleType:
    """A script as a module (benchmarks/ is not a package, and nothing edits sys.path)."""
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module
