"""Task-specialised CoDiEmb losses for sentence-transformers."""

from __future__ import annotations

from codiemb_st.losses.column_check import LossColumnCheck
from codiemb_st.losses.multi_positive_infonce import MultiPositiveCachedInfoNCELoss
from codiemb_st.losses.pearson_spearman import PearsonSpearmanLoss

__all__ = ["LossColumnCheck", "MultiPositiveCachedInfoNCELoss", "PearsonSpearmanLoss"]
