"""The one place that imports sentence-transformers internals.

sentence-transformers 6.x moved its modules (``sentence_transformers.sentence_transformer.losses``,
``sentence_transformers.base.losses.gradcache``, ``sentence_transformers.base.sampler``); the old paths
still import but warn. Everything in codiemb_st imports these names from here, so a future move is a
one-file change.
"""

from __future__ import annotations

from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
from sentence_transformers.base.losses.gradcache import CachedLossMixin, has_static_embedding_input

# Private GradCache helpers, reused so that the adaptive passes of MultiPositiveCachedInfoNCELoss split a batch into
# exactly the mini-batches of the classic passes and replay them with the mixin's own backward hook (RNG replay, DDP
# no_sync handling, frozen-mini-batch flush). Checked against sentence-transformers 6.2.
from sentence_transformers.base.losses.gradcache import _backward_hook as gradcache_replay_hook
from sentence_transformers.base.losses.gradcache import _minibatch_ranges as minibatch_ranges
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.base.sampler import DefaultBatchSampler, MultiDatasetDefaultBatchSampler
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size, is_dist_initialized


def is_distributed_inference_active(model: Any) -> bool:
    """Whether ``model.encode`` is currently sharded over DDP ranks by the trainer's distributed evaluation.

    sentence-transformers 6.x runs evaluators on rank 0 only during DDP training, while the other ranks serve
    ``encode`` shards (``sentence_transformers.util.distributed.distributed_evaluation``); it marks this by setting the
    private ``model._distributed_inference``. A collective started by the evaluator then would never be matched.
    """
    return getattr(model, "_distributed_inference", None) is not None


__all__ = [
    "BaseEvaluator",
    "CachedLossMixin",
    "DefaultBatchSampler",
    "MultiDatasetDefaultBatchSampler",
    "SentenceTransformer",
    "all_gather",
    "all_gather_with_grad",
    "embed_columns",
    "get_rank",
    "get_world_size",
    "gradcache_replay_hook",
    "has_static_embedding_input",
    "is_dist_initialized",
    "is_distributed_inference_active",
    "minibatch_ranges",
]
