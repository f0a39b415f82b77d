"""Model merging for sentence-transformers checkpoints: DeltaSoup (CoDiEmb's delta-guided fusion) and baselines.

- :class:`DeltaSoup`: per-parameter weights from how far each checkpoint moved from the base model (with
  sign-consensus and norm-rescaling variants).
- :class:`ModelSoup`: the uniform average of the checkpoints.
- :class:`TaskArithmetic`: the base plus the scaled sum of the checkpoints' deltas.
- :class:`ModelStock`: the average pulled towards the base by the deltas' mean pairwise cosine, per tensor.
- :class:`TIES`: trim each delta to its largest entries, elect signs, average the agreeing entries.
- :class:`SLERP` / :class:`MultiSLERP`: spherical interpolation of two checkpoints / the weighted spherical (Karcher)
  mean of K, of the deltas or the weights, per tensor.
- :class:`CocktailSoup`: the weighted average with weights softmax(−loss / T) of each checkpoint's loss on a few
  examples (LM-Cocktail style), scored with its own modules, pooling and prompts.
- :class:`GreedySoup`: add checkpoints one by one while an evaluator's score does not drop, with any method above.

All data-free methods share :meth:`MergeMethod.merge` (stream model folders, return a SentenceTransformer),
:meth:`MergeMethod.merge_to_folder` and the pure per-tensor :meth:`MergeMethod.merge_tensors`. Layers, one way:
:mod:`~codiemb_st.merging.tensor_math` (per-tensor math, no I/O) <- :mod:`~codiemb_st.merging.streaming_merge`
(model folders, safetensors streaming) <- :mod:`~codiemb_st.merging.methods` (the public methods) <-
:mod:`~codiemb_st.merging.greedy_soup` (evaluator-guided).
"""

from __future__ import annotations

from codiemb_st.merging.cocktail import CocktailSoup, CocktailWeights
from codiemb_st.merging.greedy_soup import GreedySoup, GreedySoupResult
from codiemb_st.merging.methods import (
    MERGE_METHODS,
    SLERP,
    TIES,
    DeltaSoup,
    MergeMethod,
    ModelSoup,
    ModelStock,
    MultiSLERP,
    TaskArithmetic,
)

# CocktailSoup needs example data, but it is a MergeMethod with constructor options like the others: ``codiemb-st
# merge --method cocktail_soup --examples FILE`` (registered here: methods.py cannot import it without a cycle).
MERGE_METHODS["cocktail_soup"] = CocktailSoup

__all__ = [
    "MERGE_METHODS",
    "SLERP",
    "TIES",
    "CocktailSoup",
    "CocktailWeights",
    "DeltaSoup",
    "GreedySoup",
    "GreedySoupResult",
    "MergeMethod",
    "ModelSoup",
    "ModelStock",
    "MultiSLERP",
    "SLERP",
    "TaskArithmetic",
]
