"""codiemb-st: the CoDiEmb training recipe (arXiv 2508.11442) for sentence-transformers.

The public names are imported on first use (PEP 562), so ``import codiemb_st`` and the command line's ``--help``
do not import torch, sentence-transformers or mteb.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0.dev0"

#: Public name -> the module that defines it.
_LAZY = {
    "dataset_from_records": "codiemb_st.data",
    "ir_dataset_from_records": "codiemb_st.data",
    "read_records": "codiemb_st.record_formats",
    "sts_dataset_from_records": "codiemb_st.data",
    "MTEBEvaluator": "codiemb_st.evaluation",
    "LossColumnCheck": "codiemb_st.losses",
    "MultiPositiveCachedInfoNCELoss": "codiemb_st.losses",
    "PearsonSpearmanLoss": "codiemb_st.losses",
    "SLERP": "codiemb_st.merging",
    "TIES": "codiemb_st.merging",
    "CocktailSoup": "codiemb_st.merging",
    "DeltaSoup": "codiemb_st.merging",
    "GreedySoup": "codiemb_st.merging",
    "MergeMethod": "codiemb_st.merging",
    "ModelSoup": "codiemb_st.merging",
    "ModelStock": "codiemb_st.merging",
    "MultiSLERP": "codiemb_st.merging",
    "TaskArithmetic": "codiemb_st.merging",
    "RoundRobinTaskBatchSampler": "codiemb_st.sampling",
}

if TYPE_CHECKING:
    from codiemb_st.data import dataset_from_records, ir_dataset_from_records, sts_dataset_from_records
    from codiemb_st.evaluation import MTEBEvaluator
    from codiemb_st.losses import LossColumnCheck, MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss
    from codiemb_st.merging import (
        SLERP,
        TIES,
        CocktailSoup,
        DeltaSoup,
        GreedySoup,
        MergeMethod,
        ModelSoup,
        ModelStock,
        MultiSLERP,
        TaskArithmetic,
    )
    from codiemb_st.record_formats import read_records
    from codiemb_st.sampling import RoundRobinTaskBatchSampler


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'codiemb_st' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "SLERP",
    "TIES",
    "CocktailSoup",
    "DeltaSoup",
    "GreedySoup",
    "LossColumnCheck",
    "MTEBEvaluator",
    "MergeMethod",
    "ModelSoup",
    "ModelStock",
    "MultiSLERP",
    "MultiPositiveCachedInfoNCELoss",
    "PearsonSpearmanLoss",
    "RoundRobinTaskBatchSampler",
    "TaskArithmetic",
    "dataset_from_records",
    "ir_dataset_from_records",
    "read_records",
    "sts_dataset_from_records",
]
