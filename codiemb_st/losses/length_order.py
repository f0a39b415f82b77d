"""Length-aware embedding: embed a column in length-sorted chunks, each trimmed to its own longest text.

A column is padded to the longest text of its batch, so on short, uneven texts (NLI/STS pairs, queries) most of what
the encoder computes is padding. Sorting the column's rows by their real (attention-mask) length before cutting it
into chunks puts texts of similar length together, and each chunk is then embedded at its own width. The embeddings
are put back in the original row order before any scoring, so the loss and every gradient are what one forward pass
over the padded column gives (up to floating-point rounding of differently shaped matrix products).

Only plain padded text features are sorted (``input_ids``/``attention_mask`` style tensors whose first axis is the
batch); flattened (``cu_seq_lens_q``), multimodal or otherwise unusual features are left as they are.

Padding on the left (decoder embedders) is trimmed only where positions stay right: the chunk then gets explicit
``position_ids`` equal to the positions its tokens have in the full-width column, which the model would otherwise
derive from the column width. That is only done for models with rotary position embeddings (whose default positions
are ``arange(width)``) that accept ``position_ids``; other left-padded models keep their leading padding.

Example:
    ::

        from codiemb_st.losses.length_order import chunk_feature, column_chunks, restore_order, sort_by_length

        sorted_feature, order = sort_by_length(features)
        parts = [
            model(chunk_feature(sorted_feature, begin, end, keep_positions=False))["sentence_embedding"]
            for begin, end in column_chunks(sorted_feature)
        ]
        embeddings = restore_order(torch.cat(parts), order)  # rows in the order of ``features``
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

#: Estimated fixed cost of one more forward + backward call, in padded tokens, on the CPU: a chunk boundary is made only
#: where it saves more padded tokens than this. Measured here (all-MiniLM-L6-v2, one thread): a token costs about 1 ms
#: forward + backward and a call's fixed cost is 15-70 ms.
CPU_CHUNK_OVERHEAD_TOKENS = 64

#: The same on accelerators (CUDA...), where a call's fixed cost (kernel launches) is worth far more tokens. An estimate,
#: not measured in this project: large enough that only big batches of uneven texts are cut into several chunks.
ACCELERATOR_CHUNK_OVERHEAD_TOKENS = 16384

#: If set, overrides both (e.g. in tests, to cut tiny batches into chunks).
CHUNK_OVERHEAD_TOKENS: int | None = None

#: Candidate chunk boundaries per column: the search over boundaries is quadratic in this number.
MAX_BOUNDARIES = 64

# Keys whose rows follow the batch but which have no token axis to trim.
_ROW_METADATA_KEYS = frozenset({"prompt_length"})


def _plain_width(feature: dict[str, Any]) -> int | None:
    """The token width of a plain padded text feature, or None when the feature is not one.

    Plain: a 2-D ``attention_mask`` and every other tensor either ``(batch, width, ...)`` or ``(batch,)``
    metadata such as ``prompt_length``; no flattened (``cu_seq_lens_q``) layout.
    """
    mask = feature.get("attention_mask")
    if "cu_seq_lens_q" in feature or not isinstance(mask, Tensor) or mask.ndim != 2:
        return None
    batch, width = mask.shape
    for key, value in feature.items():
        if not isinstance(value, Tensor):
            continue
        if key in _ROW_METADATA_KEYS:
            continue
        if value.ndim < 2 or value.shape[0] != batch or value.shape[1] != width:
            return None
    return width


def real_lengths(feature: dict[str, Any]) -> Tensor | None:
    """Number of attended tokens of every row of a plain padded feature, or None for other features."""
    if _plain_width(feature) is None:
        return None
    return feature["attention_mask"].sum(dim=1)


def _take_rows(feature: dict[str, Any], rows: Tensor | slice, batch: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in feature.items():
        if isinstance(value, Tensor) and value.ndim >= 1 and value.shape[0] == batch:
            result[key] = value[rows]
        else:
            result[key] = value
    return result


def sort_by_length(feature: dict[str, Any]) -> tuple[dict[str, Any], Tensor | None]:
    """Sort a feature's rows by real length, shortest first (a stable sort).

    Shortest first puts the longest texts in a column's last mini-batch, which is the one GradCache's kept graph (see
    ``MultiPositiveCachedInfoNCELoss(keep_graphs=...)``) saves re-embedding: the biggest saving, at no extra peak
    memory (the longest mini-batch is the peak anyway).

    Args:
        feature: One tokenized column.

    Returns:
        ``(sorted_feature, order)`` with ``sorted_feature[i] = feature[order[i]]``. ``order`` is None (and the feature
        returned as it is) when the rows are already in that order or the feature is not a plain padded one.
    """
    lengths = real_lengths(feature)
    if lengths is None or lengths.numel() < 2:
        return feature, None
    order = torch.sort(lengths, stable=True).indices
    if bool((order == torch.arange(order.numel(), device=order.device)).all()):
        return feature, None
    return _take_rows(feature, order, lengths.numel()), order


def restore_order(embeddings: Tensor, order: Tensor | None) -> Tensor:
    """Rows of ``embeddings`` (in sorted order) put back in the original order; differentiable."""
    if order is None:
        return embeddings
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return embeddings.index_select(0, inverse.to(embeddings.device))


@dataclass(frozen=True)
class SortedColumns:
    """What a loss needs to score length-sorted columns: the labels and every column's sort order.

    It travels through ``CachedLossMixin`` in the place of the labels (which the mixin only hands on to
    ``calculate_loss``), so nothing is kept on the loss between its forward and backward passes.
    """

    labels: Any
    orders: tuple[Tensor | None, ...]

    def restore(self, columns: list[Tensor]) -> list[Tensor]:
        """Every column's embeddings in the original row order."""
        return [restore_order(column, order) for column, order in zip(columns, self.orders)]


def sort_columns(features: list[dict[str, Any]], labels: Any) -> tuple[list[dict[str, Any]], Any]:
    """Sort every column by length; returns the sorted features and ``labels`` wrapped in :class:`SortedColumns`.

    ``labels`` is returned as it is when no column needed sorting.
    """
    sorted_features, orders = [], []
    for feature in features:
        sorted_feature, order = sort_by_length(feature)
        sorted_features.append(sorted_feature)
        orders.append(order)
    if all(order is None for order in orders):
        return features, labels
    return sorted_features, SortedColumns(labels, tuple(orders))


def chunk_overhead_tokens(device: torch.device | str) -> int:
    """The fixed cost of one more forward call on ``device``, in padded tokens (see :func:`padding_chunks`)."""
    if CHUNK_OVERHEAD_TOKENS is not None:
        return CHUNK_OVERHEAD_TOKENS
    return CPU_CHUNK_OVERHEAD_TOKENS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_OVERHEAD_TOKENS


def column_chunks(feature: dict[str, Any], max_rows: int | None = None) -> list[tuple[int, int]] | None:
    """:func:`padding_chunks` of a length-sorted plain padded feature, with the overhead of its device.

    Returns None for a feature that is not a plain padded one.
    """
    lengths = real_lengths(feature)
    if lengths is None:
        return None
    max_rows = len(lengths) if max_rows is None else max_rows
    return padding_chunks(lengths.tolist(), max_rows, chunk_overhead_tokens(lengths.device))


def padding_chunks(
    lengths: list[int], max_rows: int, overhead_tokens: int | None = None, max_boundaries: int | None = None
) -> list[tuple[int, int]]:
    """Cut rows sorted by increasing length into chunks that minimise the padded tokens embedded.

    A chunk ``[begin, end)`` is embedded at the width of its last (longest) row, so it costs
    ``(end - begin) * lengths[end - 1]`` padded tokens plus ``overhead_tokens`` for the extra forward call. Boundaries
    are searched (exactly, by dynamic programming) among at most ``max_boundaries`` evenly spaced rows.

    Args:
        lengths: Real lengths, sorted in increasing order.
        max_rows: Most rows in a chunk.
        overhead_tokens: Cost of one forward call in padded tokens (default: the CPU's, see
            :func:`chunk_overhead_tokens`).
        max_boundaries: Most candidate boundaries (default :data:`MAX_BOUNDARIES`).

    Returns:
        ``(begin, end)`` row ranges covering ``range(len(lengths))`` in order.
    """
    overhead = chunk_overhead_tokens("cpu") if overhead_tokens is None else overhead_tokens
    boundaries_cap = MAX_BOUNDARIES if max_boundaries is None else max_boundaries
    n = len(lengths)
    if n == 0:
        return []
    step = max(1, math.ceil(n / boundaries_cap))
    cuts = list(range(0, n, step)) + [n]
    best = [0.0] + [math.inf] * (len(cuts) - 1)
    previous = [0] * len(cuts)
    for j in range(1, len(cuts)):
        for i in range(j - 1, -1, -1):
            rows = cuts[j] - cuts[i]
            if rows > max_rows:
                break
            cost = best[i] + rows * lengths[cuts[j] - 1] + overhead
            if cost < best[j]:
                best[j], previous[j] = cost, i
        if best[j] == math.inf:  # step > max_rows: fall back to chunks of max_rows
            return [(begin, min(begin + max_rows, n)) for begin in range(0, n, max_rows)]
    ranges = []
    j = len(cuts) - 1
    while j > 0:
        i = previous[j]
        ranges.append((cuts[i], cuts[j]))
        j = i
    return ranges[::-1]


def keeps_positions_with_position_ids(model: Any) -> bool:
    """Whether explicit ``position_ids = arange(width)`` reproduce the positions ``model`` derives by itself.

    True for transformers models with rotary position embeddings (Llama, Qwen, Mistral, Gemma...) whose forward
    takes ``position_ids``: they number the tokens of a padded batch ``0..width-1`` whatever the padding. Models that
    derive positions from the padding (RoBERTa-style) or do not take ``position_ids`` get False.
    """
    from codiemb_st._compat import Transformer, unwrap_model

    model = unwrap_model(model)
    try:
        modules = list(model.children())
    except AttributeError:
        return False
    transformer = next((module for module in modules if isinstance(module, Transformer)), None)
    auto_model = getattr(transformer, "model", None) if transformer is not None else None
    if auto_model is None:
        return False
    cached = getattr(auto_model, "_codiemb_arange_positions", None)
    if cached is not None:
        return cached
    try:
        accepts = "position_ids" in inspect.signature(auto_model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    rotary = any(name.split(".")[-1] == "rotary_emb" for name, _ in auto_model.named_modules())
    result = accepts and rotary
    try:
        auto_model._codiemb_arange_positions = result
    except AttributeError:
        pass
    return result


def chunk_feature(feature: dict[str, Any], begin: int, end: int, keep_positions: bool) -> dict[str, Any]:
    """Rows ``begin:end`` of a plain padded feature, trimmed to the token columns some row of the chunk attends.

    Trailing padding is always trimmed. Leading (left) padding is trimmed only with ``keep_positions``: the chunk then
    carries ``position_ids`` giving its tokens the positions they have in the full-width feature (see
    :func:`keeps_positions_with_position_ids`). A feature that already has ``position_ids`` keeps its own (sliced).

    Args:
        feature: A plain padded feature (see :func:`real_lengths`).
        begin: First row.
        end: Row after the last.
        keep_positions: Whether leading padding may be trimmed with explicit positions.

    Returns:
        The chunk's feature dict (views of ``feature`` where possible).
    """
    mask = feature["attention_mask"]
    batch, width = mask.shape
    active = mask[begin:end].bool().any(dim=0)
    nonzero = active.nonzero()
    if nonzero.numel() == 0:
        first, last = 0, width
    else:
        first, last = int(nonzero[0].item()), int(nonzero[-1].item()) + 1
    has_positions = isinstance(feature.get("position_ids"), Tensor)
    if first > 0 and not (keep_positions or has_positions):
        first = 0
    result: dict[str, Any] = {}
    for key, value in feature.items():
        if not isinstance(value, Tensor) or value.ndim == 0 or value.shape[0] != batch:
            result[key] = value
        elif value.ndim >= 2 and value.shape[1] == width:
            result[key] = value[begin:end, first:last]
        else:
            result[key] = value[begin:end]
    if first > 0 and not has_positions:
        positions = torch.arange(first, last, device=mask.device, dtype=torch.long)
        result["position_ids"] = positions.unsqueeze(0).expand(end - begin, -1)
    return result


__all__ = [
    "ACCELERATOR_CHUNK_OVERHEAD_TOKENS",
    "CHUNK_OVERHEAD_TOKENS",
    "CPU_CHUNK_OVERHEAD_TOKENS",
    "SortedColumns",
    "chunk_feature",
    "chunk_overhead_tokens",
    "column_chunks",
    "keeps_positions_with_position_ids",
    "padding_chunks",
    "real_lengths",
    "restore_order",
    "sort_by_length",
    "sort_columns",
]
