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

Every method shares :meth:`MergeMethod.merge` (stream model folders, return a SentenceTransformer),
:meth:`MergeMethod.merge_to_folder` (which also writes a model card) and the pure per-tensor
:meth:`MergeMethod.merge_tensors`. One module per method family holds its class and its math and registers it in
:data:`MERGE_METHODS` where it is defined (:mod:`~codiemb_st.merging.base` has the base class and the driver;
:mod:`~codiemb_st.merging.streaming_merge` the I/O, which knows no method). Adding a method is one new module in this
package: every module here is imported below, so it registers itself (see docs/extending.md).
"""

from __future__ import annotations

import importlib
import pkgutil

from codiemb_st.merging.base import MERGE_METHODS, MergeMethod
from codiemb_st.merging.cocktail import CocktailSoup, CocktailWeights
from codiemb_st.merging.delta_soup import DeltaSoup
from codiemb_st.merging.greedy_soup import GreedySoup, GreedySoupResult
from codiemb_st.merging.model_stock import ModelStock
from codiemb_st.merging.soup import ModelSoup, TaskArithmetic
from codiemb_st.merging.spherical import SLERP, MultiSLERP
from codiemb_st.merging.ties import TIES

# A method registers itself when its module is imported: import every module of the package, so that a new method
# file is on the command line and in MERGE_METHODS without a line here.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

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
    "TaskArithmetic",
]
