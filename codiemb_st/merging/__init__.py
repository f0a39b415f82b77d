"""Model merging for sentence-transformers checkpoints: DeltaSoup (CoDiEmb's delta-guided fusion) and baselines.

- :class:`DeltaSoup`: per-parameter weights from how far each checkpoint moved from the base model.
- :class:`ModelSoup`: the uniform average of the checkpoints.
- :class:`TaskArithmetic`: the base plus the scaled sum of the checkpoints' deltas.

All three share :meth:`MergeMethod.merge` (stream model folders, return a SentenceTransformer),
:meth:`MergeMethod.merge_to_folder` and the pure per-tensor :meth:`MergeMethod.merge_tensors`.
"""

from __future__ import annotations

from codiemb_st.merging.methods import DeltaSoup, MergeMethod, ModelSoup, TaskArithmetic

__all__ = ["DeltaSoup", "MergeMethod", "ModelSoup", "TaskArithmetic"]
