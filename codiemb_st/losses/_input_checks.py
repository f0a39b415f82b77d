"""Input checks shared by the task losses: what a loss does with a batch or an option it cannot use.

Kept apart from the loss files so that each loss only calls one function at the top of ``__init__`` / ``forward``.
The rules (also in docs/bad-input.md):

- An option of the wrong type raises ``TypeError``, a value out of range ``ValueError``, naming the option.
- A temperature so small that ``1 / temperature`` overflows float32 (the dtype the similarities are scaled in)
  raises ``ValueError``: the scaled similarities would be infinite and the loss NaN.
- A batch too small to define the loss contributes a loss of 0 (attached to the graph, so the trainer and DDP see an
  ordinary step) and logs a warning saying how to avoid it: an empty batch for either loss, an STS batch of one pair,
  and an IR batch of one query without hard negatives (its softmax has a single candidate, so the loss and every
  gradient are exactly 0). A 1-row last batch is normal without ``dataloader_drop_last=True``, so this is a warning,
  not an error that would end a long run at the last step of an epoch.
- Labels that are not a numeric tensor (e.g. strings) raise ``TypeError`` naming the score column.
- Wrapping the GradCache IR loss in ``AdaptiveLayerLoss`` raises ``TypeError`` (unsupported, see
  :func:`check_not_in_adaptive_layer_loss`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from codiemb_st._compat import is_adaptive_layer_loss_active, is_dist_initialized

logger = logging.getLogger(__name__)

# The similarities are scaled in the embeddings' dtype, float32 in practice (bfloat16 has the same range).
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def check_model(loss_name: str, model: Any) -> None:
    """Refuse a ``model`` that is not a module, e.g. a model name given instead of a loaded model.

    Raises:
        TypeError: Naming ``model`` and what was given.
    """
    if not isinstance(model, nn.Module):
        hint = f" Load it first: SentenceTransformer({model!r})." if isinstance(model, str) else ""
        raise TypeError(f"{loss_name}: `model` must be a SentenceTransformer; got {type(model).__name__}.{hint}")


def check_inverse_temperature(loss_name: str, temperature: Any, argument: str = "temperature") -> None:
    """Refuse a positive ``temperature`` whose inverse is not a finite float32 number.

    Only checks what the loss's own range checks cannot see; non-numbers and values <= 0 are left to them.

    Raises:
        ValueError: If ``1 / temperature`` overflows float32.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        return
    try:
        inverse = 1.0 / temperature
    except (OverflowError, ZeroDivisionError):
        inverse = float("inf")
    if not inverse <= _FLOAT32_MAX:
        raise ValueError(
            f"{loss_name}: `{argument}`={temperature!r} is so small that 1/{argument} ({inverse:.3g}) overflows "
            f"float32 (max {_FLOAT32_MAX:.3g}): the scaled similarities would be infinite and the loss NaN. Use a "
            "temperature such as 0.01-0.1 (the official CoDiEmb values are 0.02 for IR and 0.05 for STS)."
        )


def check_infonce_options(loss_name: str, model: Any, temperature: Any) -> None:
    """``__init__`` checks of the IR loss beyond its own range checks (see :func:`check_model`,
    :func:`check_inverse_temperature`)."""
    check_model(loss_name, model)
    check_inverse_temperature(loss_name, temperature)


def _num_rows(column: Any) -> int | None:
    """Rows of one column: a tensor's first dimension, or that of the first tensor in a features dict."""
    if isinstance(column, Tensor):
        return int(column.shape[0]) if column.ndim else None
    if isinstance(column, Mapping):
        for value in column.values():
            if isinstance(value, Tensor) and value.ndim:
                return int(value.shape[0])
    return None


def num_rows(column: Any) -> int:
    """Rows of one column (a tensor or a tokenized features dict); 0 when it has no batch axis."""
    return _num_rows(column) or 0


def zero_loss(model: nn.Module) -> Tensor:
    """A loss of 0 that reaches every trainable parameter (with zero gradients), so that DDP's reducer and the
    trainer handle the step like any other."""
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    if not parameters:
        return torch.zeros(())
    return torch.stack([parameter.reshape(-1)[:1].sum() for parameter in parameters]).sum() * 0.0


def check_not_in_adaptive_layer_loss(loss: nn.Module) -> None:
    """Refuse to run inside ``AdaptiveLayerLoss``, which would otherwise fail later with a bare ``KeyError``.

    Raises:
        TypeError: Saying that the combination is unsupported, why, and what to use instead.
    """
    if is_adaptive_layer_loss_active(loss.model):
        name = type(loss).__name__
        raise TypeError(
            f"AdaptiveLayerLoss cannot wrap {name}: {name} uses GradCache, which embeds the batch without gradients "
            "and re-embeds it mini-batch by mini-batch in the backward pass, after AdaptiveLayerLoss has removed the "
            "per-layer cache it runs the inner loss on (sentence-transformers' CachedMultipleNegativesRankingLoss "
            "has the same limitation). Use MatryoshkaLoss, which supports it, or wrap an uncached loss such as "
            "MultipleNegativesRankingLoss (equal to this loss for num_positives=1 and mask_duplicates=False)."
        )


def ir_batch_fallback(loss: nn.Module, columns: Sequence[Any]) -> Tensor | None:
    """Checks at the top of the IR loss's ``forward`` / ``compute_loss_from_embeddings``.

    Args:
        loss: The IR loss (``model``, ``num_positives``, ``gather_across_devices``).
        columns: The batch's text columns: tokenized feature dicts, or embeddings ``(batch, dim)``.

    Returns:
        A zero loss (and a logged warning) for an empty batch, else ``None``: compute the loss as usual. A batch of
        one query without hard negatives (over all ranks when gathering) also logs a warning; its loss is 0.

    Raises:
        TypeError: Inside ``AdaptiveLayerLoss`` (see :func:`check_not_in_adaptive_layer_loss`).
    """
    check_not_in_adaptive_layer_loss(loss)
    name = type(loss).__name__
    rows = _num_rows(columns[0]) if len(columns) else None
    if rows == 0:
        logger.warning(
            "%s got an empty batch (0 queries); it contributes a loss of 0. Drop empty batches before the loss.", name
        )
        return zero_loss(loss.model)
    if rows == 1 and len(columns) <= 1 + loss.num_positives:
        gathering = loss.gather_across_devices and is_dist_initialized() and torch.distributed.get_world_size() > 1
        if not gathering:
            logger.warning(
                "%s got a batch of 1 query and no hard negatives: its softmax has a single candidate, so the loss "
                "and every gradient of this step are exactly 0. Use batches of at least 2 queries (set "
                "`dataloader_drop_last=True` to drop a short last batch) or add hard negative columns.",
                name,
            )
    return None


def check_sts_labels(loss_name: str, labels: Any) -> None:
    """Refuse STS labels that are not a numeric tensor (``None`` is left to the loss's own message).

    Raises:
        TypeError: Naming the score column and what was given.
    """
    if labels is None:
        return
    if not isinstance(labels, Tensor):
        kind, kinds = type(labels).__name__, set()
        if isinstance(labels, Iterable) and not isinstance(labels, (str, bytes)):
            kinds = {type(item).__name__ for item in labels}
            kind += f" of {', '.join(sorted(kinds))}" if kinds else " (empty)"
        fix = (
            "Convert the string scores to floats (e.g. dataset.map(lambda row: {'score': float(row['score'])}))."
            if "str" in kinds or isinstance(labels, str)
            else "Pass torch.tensor(scores)."
        )
        raise TypeError(
            f"{loss_name}: `labels` (the dataset's 'score' column) must be a tensor of numbers, one gold score per "
            f"pair; got {kind}. {fix}"
        )
    if labels.dtype == torch.bool or labels.is_complex() or not (labels.is_floating_point() or _is_integer(labels)):
        raise TypeError(
            f"{loss_name}: `labels` (the dataset's 'score' column) must hold real numbers; got dtype {labels.dtype}."
        )


def _is_integer(tensor: Tensor) -> bool:
    return not tensor.is_floating_point() and not tensor.is_complex() and tensor.dtype != torch.bool


def sts_batch_fallback(loss: nn.Module, sentence_features: Sequence[Any], labels: Any) -> Tensor | dict | None:
    """Checks at the top of the STS loss's ``forward``, before the pairs are embedded.

    Returns:
        For an empty batch, the loss's own result for no pairs: the documented 0 (or dict of zero terms) with a
        warning for batches of fewer than 2 pairs. Else ``None``: compute the loss as usual.

    Raises:
        TypeError: If ``labels`` is not a numeric tensor (see :func:`check_sts_labels`).
    """
    check_sts_labels(type(loss).__name__, labels)
    rows = _num_rows(sentence_features[0]) if len(sentence_features) else None
    if rows != 0:
        return None
    # Embedding zero texts fails inside the transformer (a reshape error), so hand the loss zero scores that are
    # attached to the parameters instead; it applies its own rule (and message) for short batches.
    no_scores = zero_loss(loss.model).reshape(1)[:0]
    # The middle-layer term (if on) gets no embeddings either: no anchor, so it is 0 like the other terms.
    no_middle = [no_scores.reshape(0, 1), no_scores.reshape(0, 1)] if getattr(loss, "mid_nce_weight", 0) > 0 else None
    return (
        loss.compute_loss_from_scores(no_scores, labels, no_middle)
        if no_middle
        else loss.compute_loss_from_scores(no_scores, labels)
    )


__all__ = [
    "check_inverse_temperature",
    "check_infonce_options",
    "check_model",
    "check_not_in_adaptive_layer_loss",
    "check_sts_labels",
    "ir_batch_fallback",
    "num_rows",
    "sts_batch_fallback",
    "zero_loss",
]
