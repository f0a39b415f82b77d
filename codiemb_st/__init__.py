"""codiemb-st: the CoDiEmb training recipe (arXiv 2508.11442) for sentence-transformers."""

from __future__ import annotations

from codiemb_st.data import (
    dataset_from_records,
    ir_dataset_from_records,
    read_records,
    sts_dataset_from_records,
)
from codiemb_st.evaluation import MTEBEvaluator
from codiemb_st.losses import LossColumnCheck, MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss
from codiemb_st.merging import TIES, DeltaSoup, GreedySoup, MergeMethod, ModelSoup, ModelStock, TaskArithmetic
from codiemb_st.sampling import RoundRobinTaskBatchSampler

__version__ = "0.1.0.dev0"

__all__ = [
    "TIES",
    "DeltaSoup",
    "GreedySoup",
    "LossColumnCheck",
    "MTEBEvaluator",
    "MergeMethod",
    "ModelSoup",
    "ModelStock",
    "MultiPositiveCachedInfoNCELoss",
    "PearsonSpearmanLoss",
    "RoundRobinTaskBatchSampler",
    "TaskArithmetic",
    "dataset_from_records",
    "ir_dataset_from_records",
    "read_records",
    "sts_dataset_from_records",
]
