from __future__ import annotations

from codiemb_st.losses.multi_positive_infonce import MultiPositiveCachedInfoNCELoss

__all__ = ["MultiPositiveCachedInfoNCELoss"]
