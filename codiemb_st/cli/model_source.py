"""Check a model argument before anything heavy is loaded: a local folder, a cached hub model, or a reachable hub.

Without this, a hub name that cannot be fetched (``HF_HUB_OFFLINE=1``, or no network) makes transformers retry
with back-off: dozens of log lines over a minute before the real error. Here it is one line, in seconds.
"""

from __future__ import annotations

import os
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


__all__ = ["check_model_source"]
