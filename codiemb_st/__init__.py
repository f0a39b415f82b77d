"""codiemb-st: the CoDiEmb training recipe (arXiv 2508.11442) for sentence-transformers."""

from __future__ import annotations

from codiemb_st.evaluation import MTEBEvaluator

__version__ = "0.1.0.dev0"

__all__: list[str] = ["MTEBEvaluator"]
