"""The one place that imports sentence-transformers internals.

sentence-transformers 6.x moved its modules (``sentence_transformers.sentence_transformer.losses``,
``sentence_transformers.base.losses.gradcache``, ``sentence_transformers.base.sampler``); the old paths
still import but warn. Everything in codiemb_st imports these names from here, so a future move is a
one-file change.
"""

from __future__ import annotations

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.losses.gradcache import CachedLossMixin, has_static_embedding_input
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.base.sampler import DefaultBatchSampler, MultiDatasetDefaultBatchSampler
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size, is_dist_initialized

__all__ = [
    "CachedLossMixin",
    "DefaultBatchSampler",
    "MultiDatasetDefaultBatchSampler",
    "SentenceTransformer",
    "all_gather",
    "all_gather_with_grad",
    "embed_columns",
    "get_rank",
    "get_world_size",
    "has_static_embedding_input",
    "is_dist_initialized",
]
