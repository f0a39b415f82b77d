"""The one place that imports sentence-transformers internals.

sentence-transformers 6.x moved its modules (``sentence_transformers.sentence_transformer.losses``,
``sentence_transformers.base.losses.gradcache``, ``sentence_transformers.base.sampler``); the old paths
still import but warn. Everything in codiemb_st imports these names from here, so a future move is a
one-file change.
"""

from __future__ import annotations

import sys
from typing import Any

from sentence_transformers import SentenceTransformer
from sentence_transformers.base.evaluation.evaluator import BaseEvaluator
from sentence_transformers.base.losses.gradcache import CachedLossMixin, RandContext, has_static_embedding_input

# Private GradCache helpers, reused so that the adaptive passes of MultiPositiveCachedInfoNCELoss split a batch into
# exactly the mini-batches of the classic passes and replay them with the mixin's own backward hook (RNG replay, DDP
# no_sync handling, frozen-mini-batch flush). Checked against sentence-transformers 6.2.
from sentence_transformers.base.losses.gradcache import _backward_hook as gradcache_replay_hook
from sentence_transformers.base.losses.gradcache import _minibatch_ranges as minibatch_ranges
from sentence_transformers.base.losses.merged_forward import embed_columns
from sentence_transformers.base.sampler import (
    DefaultBatchSampler,
    MultiDatasetBatchSamplers,
    MultiDatasetDefaultBatchSampler,
)
from sentence_transformers.sentence_transformer.losses import CoSENTLoss, MultipleNegativesRankingLoss
from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
from sentence_transformers.util import all_gather, all_gather_with_grad, get_rank, get_world_size, is_dist_initialized


def is_distributed_inference_active(model: Any) -> bool:
    """Whether ``model.encode`` is currently sharded over DDP ranks by the trainer's distributed evaluation.

    sentence-transformers 6.x runs evaluators on rank 0 only during DDP training, while the other ranks serve
    ``encode`` shards (``sentence_transformers.util.distributed.distributed_evaluation``); it marks this by setting the
    private ``model._distributed_inference``. A collective started by the evaluator then would never be matched.
    """
    return getattr(model, "_distributed_inference", None) is not None


def unwrap_model(model: Any) -> Any:
    """``model`` without DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif not isinstance(model, SentenceTransformer) and hasattr(model, "module"):
            model = model.module
        else:
            return model


def is_adaptive_layer_loss_active(model: Any) -> bool:
    """Whether ``AdaptiveLayerLoss`` is running a loss on ``model`` right now.

    ``AdaptiveLayerLoss.forward`` replaces the Transformer module's ``forward`` with its ``TransformerDecorator``
    for the duration of the wrapped loss's call (``sentence_transformer/losses/adaptive_layer.py``).
    """
    from sentence_transformers.sentence_transformer.losses.adaptive_layer import TransformerDecorator

    model = unwrap_model(model)
    try:
        first_module = model[0]
    except (TypeError, IndexError, KeyError):
        return False
    return isinstance(getattr(first_module, "forward", None), TransformerDecorator)


def calling_trainer_args(max_depth: int = 12) -> Any | None:
    """The ``args`` of the transformers ``Trainer`` whose method is calling us, or ``None``.

    sentence-transformers builds the multi-dataset batch sampler in ``Trainer.get_multi_dataset_batch_sampler`` and
    calls the factory with ``(dataset, batch_samplers, generator, seed)`` only, so a sampler has no other way to
    learn the trainer's settings (e.g. ``gradient_accumulation_steps``). Looking up the caller's ``self`` is exact
    and, unlike accelerate's process-wide ``GradientState``, never reports a previous trainer's settings.
    """
    from transformers import Trainer

    frame = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate.args
        frame = frame.f_back
    return None


__all__ = [
    "BaseEvaluator",
    "CachedLossMixin",
    "CoSENTLoss",
    "DefaultBatchSampler",
    "MultiDatasetBatchSamplers",
    "MultiDatasetDefaultBatchSampler",
    "MultipleNegativesRankingLoss",
    "Pooling",
    "RandContext",
    "SentenceTransformer",
    "Transformer",
    "all_gather",
    "all_gather_with_grad",
    "calling_trainer_args",
    "embed_columns",
    "get_rank",
    "get_world_size",
    "gradcache_replay_hook",
    "has_static_embedding_input",
    "is_adaptive_layer_loss_active",
    "is_dist_initialized",
    "is_distributed_inference_active",
    "unwrap_model",
    "minibatch_ranges",
]
