"""codiemb-st: the CoDiEmb training recipe (arXiv 2508.11442) for sentence-transformers."""

from __future__ import annotations

__version__ = "0.1.0.dev0"

from codiemb_st.evaluation import MTEBEvaluator
from codiemb_st.losses import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss
from codiemb_st.merging import DeltaSoup, MergeMethod, ModelSoup, TaskArithmetic

__all__ = [
    "DeltaSoup",
    "MTEBEvaluator",
    "MergeMethod",
    "ModelSoup",
    "MultiPositiveCachedInfoNCELoss",
    "PearsonSpearmanLoss",
    "TaskArithmetic",
]
