"""Model merging for sentence-transformers checkpoints: DeltaSoup (CoDiEmb's delta-guided fusion) and baselines.

- :class:`DeltaSoup`: per-parameter weights from how far each checkpoint moved from the base model.
- :class:`ModelSoup`: the uniform average of the checkpoints.
- :class:`TaskArithmetic`: the base plus the scaled sum of the checkpoints' deltas.

All share :meth:`MergeMethod.merge` (stream model folders, return a SentenceTransformer),
:meth:`MergeMethod.merge_to_folder` and the pure per-tensor :meth:`MergeMethod.merge_tensors`. Layers, one way:
:mod:`~codiemb_st.merging.tensor_math` (per-tensor math, no I/O) <- :mod:`~codiemb_st.merging.streaming_merge`
(model folders, safetensors streaming) <- :mod:`~codiemb_st.merging.methods` (the public methods).
"""

from __future__ import annotations

from codiemb_st.merging.methods import MERGE_METHODS, DeltaSoup, MergeMethod, ModelSoup, TaskArithmetic

__all__ = ["MERGE_METHODS", "DeltaSoup", "MergeMethod", "ModelSoup", "TaskArithmetic"]
