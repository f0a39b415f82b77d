"""Task-specialised CoDiEmb losses for sentence-transformers."""

from __future__ import annotations

from codiemb_st.losses.multi_positive_infonce import MultiPositiveCachedInfoNCELoss
from codiemb_st.losses.pearson_spearman import PearsonSpearmanLoss

__all__ = ["MultiPositiveCachedInfoNCELoss", "PearsonSpearmanLoss"]
