"""The teacher terms and sentence-transformers 6.x InfoNCE options of
:class:`codiemb_st.losses.MultiPositiveCachedInfoNCELoss`: option checks, the per-batch targets that travel from the
forward pass to the GradCache loss computation, the guide model's embeddings, the distillation term, the hardness
penalty and the guide mask.

Kept apart from the loss file so that the loss reads as its objective; everything here is a function of tensors and
options, and nothing is kept on the loss between its forward and backward passes (the targets travel in the place of
the labels, like the text identities before them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from codiemb_st import validation

#: sentence-transformers 6.3's ``MultipleNegativesRankingLoss(directions=...)`` values, in its order.
DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")
#: Its ``partition_mode`` values.
PARTITION_MODES = ("joint", "per_direction")
#: Its ``hardness_mode`` values (``None`` = off).
HARDNESS_MODES = (None, "in_batch_negatives", "hard_negatives", "all_negatives")
#: CachedGISTEmbedLoss's ``margin_strategy`` values.
MARGIN_STRATEGIES = ("absolute", "relative")


@dataclass(frozen=True)
class LossTargets:
    """What the loss computation needs besides the embeddings, for one batch.

    It travels through sentence-transformers' ``CachedLossMixin`` in the place of the labels (which the mixin only
    hands on to ``calculate_loss``), so nothing is kept on the loss between its forward and backward passes.

    Attributes:
        text_ids: ``(batch, columns)`` int64 identities of the inputs (duplicate masking), or None.
        teacher_scores: ``(batch, P + N)`` teacher scores aligned with the candidate columns (distillation), or None.
        guide_embeddings: One ``(batch, guide_dim)`` tensor per column from the guide model (guide masking), or None.
    """

    text_ids: Tensor | None = None
    teacher_scores: Tensor | None = None
    guide_embeddings: tuple[Tensor, ...] | None = None


def as_targets(labels: Any) -> LossTargets:
    """``labels`` of the loss computation as :class:`LossTargets` (a bare tensor is the text identities)."""
    if isinstance(labels, LossTargets):
        return labels
    return LossTargets(text_ids=labels)


def check_direction_options(
    loss_name: str,
    directions: Any,
    partition_mode: Any,
    hardness_mode: Any,
    hardness_strength: Any,
    objective: str,
    in_batch_negatives: bool,
) -> tuple[str, ...]:
    """Check ``directions``, ``partition_mode``, ``hardness_mode`` and ``hardness_strength`` together.

    The rules of sentence-transformers 6.3's ``MultipleNegativesRankingLoss`` (``query_to_doc`` required,
    ``per_direction`` only with directions whose candidates include the positive), plus the combinations this loss
    cannot define: extra directions with ``objective="joint"`` or without in-batch negatives, and in-batch hardness
    without in-batch negatives.

    Returns:
        The directions as a tuple, in the order given.

    Raises:
        TypeError: If ``directions`` is not a list or tuple of strings, or ``hardness_strength`` is not a number.
        ValueError: Naming the option (and the other option it conflicts with).
    """
    if isinstance(directions, str) or not isinstance(directions, (list, tuple)):
        raise TypeError(
            f"{loss_name}: `directions` must be a tuple of direction names such as ('query_to_doc', "
            f"'doc_to_query'); got {type(directions).__name__} {directions!r}."
        )
    directions = tuple(directions)
    unknown = [direction for direction in directions if direction not in DIRECTIONS]
    if not directions or unknown:
        raise ValueError(
            f"{loss_name}: `directions` must be a non-empty subset of {DIRECTIONS}; got {directions!r}"
            + (f" (unknown: {unknown})." if unknown else ".")
        )
    if len(set(directions)) != len(directions):
        raise ValueError(f"{loss_name}: `directions` lists a direction twice: {directions!r}.")
    if "query_to_doc" not in directions:
        raise ValueError(
            f"{loss_name}: `directions` must include 'query_to_doc' (the direction that holds the positive pair); "
            f"got {directions!r}."
        )
    validation.check_choice("partition_mode", partition_mode, PARTITION_MODES)
    if partition_mode == "per_direction" and set(directions) & {"query_to_query", "doc_to_doc"}:
        raise ValueError(
            f"{loss_name}: partition_mode='per_direction' needs every direction's candidates to include the "
            "positive pair, but 'query_to_query' and 'doc_to_doc' compare same-type texts only (as in "
            "sentence-transformers' MultipleNegativesRankingLoss). Use partition_mode='joint'."
        )
    extra = [direction for direction in directions if direction != "query_to_doc"]
    if extra and objective != "per_slot":
        raise ValueError(
            f"{loss_name}: `directions` {tuple(extra)} need objective='per_slot' (for each positive slot the loss is "
            "sentence-transformers' MultipleNegativesRankingLoss with these directions); objective='joint' puts all "
            "positives in one numerator, which has no single positive pair per direction."
        )
    if extra and not in_batch_negatives:
        raise ValueError(
            f"{loss_name}: `directions` {tuple(extra)} compare a query or a positive with the other rows of the "
            "batch, which in_batch_negatives=False removes. Use directions=('query_to_doc',) or "
            "in_batch_negatives=True."
        )
    validation.check_choice("hardness_mode", hardness_mode, HARDNESS_MODES)
    validation.check_finite_float("hardness_strength", hardness_strength, minimum=0.0)
    if hardness_mode == "in_batch_negatives" and not in_batch_negatives:
        raise ValueError(
            f"{loss_name}: hardness_mode='in_batch_negatives' weights the other rows' candidates, which "
            "in_batch_negatives=False removes. Use hardness_mode='hard_negatives' or in_batch_negatives=True."
        )
    return directions


def check_distillation_options(
    loss_name: str, weight: Any, student_temperature: Any, teacher_temperature: Any
) -> None:
    """Check the distillation options (``student_temperature`` None = the loss's temperature).

    Raises:
        TypeError: If an option is not a number.
        ValueError: If the weight is negative or a temperature is not a positive finite number.
    """
    validation.check_finite_float("distillation_weight", weight, minimum=0.0)
    for name, value in (("student_temperature", student_temperature), ("teacher_temperature", teacher_temperature)):
        if value is None and name == "student_temperature":
            continue
        validation.check_positive_float(name, value)
        if not 1.0 / value < math.inf:
            raise ValueError(f"{loss_name}: `{name}`={value!r} is so small that 1/{name} overflows.")


def check_teacher_scores(
    loss_name: str, labels: Any, batch_size: int, num_candidates: int, num_positives: int
) -> Tensor:
    """Refuse teacher scores that do not fit the batch; returns them as a tensor.

    Args:
        loss_name: The loss, for the messages.
        labels: What the trainer passed as labels (the dataset's ``label`` column).
        batch_size: Rows of the batch.
        num_candidates: Candidate columns ``P + N`` of the batch.
        num_positives: ``P``.

    Raises:
        ValueError: No labels, a shape other than ``(batch, P + N)``, or NaN/infinite scores.
        TypeError: Labels that are not a numeric tensor.
    """
    layout = (
        f"one teacher score per candidate column, in the order positive_1..positive_{num_positives}, "
        f"negative_1..negative_{num_candidates - num_positives}"
    )
    if labels is None:
        raise ValueError(
            f"{loss_name}(distillation_weight > 0) needs teacher scores as labels: a dataset column 'label' holding "
            f"a list of {num_candidates} floats per row ({layout}), but the batch has no labels. Add the scores "
            "(e.g. `codiemb-st score`) or set distillation_weight=0."
        )
    if not isinstance(labels, Tensor) or labels.dtype == torch.bool or labels.is_complex():
        kind = type(labels).__name__ if not isinstance(labels, Tensor) else f"tensor of {labels.dtype}"
        raise TypeError(f"{loss_name}: teacher scores (labels) must be a float tensor ({layout}); got {kind}.")
    if labels.ndim != 2 or tuple(labels.shape) != (batch_size, num_candidates):
        hint = (
            " A 1-D label column holds one score per row; distillation needs a list of scores per row."
            if labels.ndim == 1
            else ""
        )
        raise ValueError(
            f"{loss_name}: teacher scores (labels) must have shape (batch, P + N) = ({batch_size}, {num_candidates}), "
            f"{layout}; got shape {tuple(labels.shape)}.{hint} Give every row a 'label' list of {num_candidates} "
            "scores, or change num_positives / the negative columns to match the scores."
        )
    if labels.is_floating_point() and not bool(torch.isfinite(labels).all()):
        bad = (~torch.isfinite(labels)).nonzero()[0].tolist()
        raise ValueError(
            f"{loss_name}: teacher scores (labels) contain NaN or infinite values (first at row {bad[0]}, column "
            f"{bad[1]} of {num_candidates}: {layout}). Re-score or drop those rows."
        )
    return labels


def check_guide(loss_name: str, model: Any, guide: Any) -> bool:
    """Refuse a guide that cannot be used; returns whether its inputs must be re-tokenized from the model's.

    Re-tokenizing follows sentence-transformers' ``CachedGISTEmbedLoss``: when the vocabularies differ or the guide
    truncates shorter than the model.

    Raises:
        TypeError: If ``guide`` is not a SentenceTransformer.
        ValueError: If the model or the guide has no transformers tokenizer (needed to re-tokenize).
    """
    from codiemb_st._compat import SentenceTransformer

    if not isinstance(guide, SentenceTransformer):
        hint = f" Load it first: SentenceTransformer({guide!r})." if isinstance(guide, str) else ""
        raise TypeError(f"{loss_name}: `guide` must be a SentenceTransformer; got {type(guide).__name__}.{hint}")
    from transformers import PreTrainedTokenizerBase

    tokenizers = {"model": getattr(model, "tokenizer", None), "guide": getattr(guide, "tokenizer", None)}
    missing = [name for name, tokenizer in tokenizers.items() if not isinstance(tokenizer, PreTrainedTokenizerBase)]
    if missing:
        raise ValueError(
            f"{loss_name}: guide masking re-tokenizes the model's inputs for the guide, so the {' and '.join(missing)} "
            "must have a transformers tokenizer (a `tokenizer` attribute); got "
            + ", ".join(f"{name}: {type(tokenizers[name]).__name__}" for name in missing)
            + "."
        )
    return (
        tokenizers["model"].get_vocab() != tokenizers["guide"].get_vocab()
        or guide.max_seq_length < model.max_seq_length
    )


def check_guide_embeddings(loss_name: str, guide_embeddings: Any, num_columns: int, batch_size: int) -> None:
    """Refuse guide embeddings that do not fit the batch: one ``(batch, guide_dim)`` finite tensor per column.

    Raises:
        ValueError: Naming the column and what is wrong (count, shape, NaN/inf).
    """
    if guide_embeddings is None or len(guide_embeddings) != num_columns:
        got = "none" if guide_embeddings is None else str(len(guide_embeddings))
        raise ValueError(
            f"{loss_name}(guide=...) needs one guide embedding tensor per column ({num_columns} columns: anchor, "
            f"positives, negatives); got {got}. Pass `guide_embeddings` (the guide's embeddings of the same texts)."
        )
    dims = set()
    for column, embedding in enumerate(guide_embeddings):
        if not isinstance(embedding, Tensor) or embedding.ndim != 2 or embedding.shape[0] != batch_size:
            shape = tuple(embedding.shape) if isinstance(embedding, Tensor) else type(embedding).__name__
            raise ValueError(
                f"{loss_name}: the guide embeddings of column {column} must have shape (batch, guide_dim) with batch "
                f"= {batch_size}; got {shape}."
            )
        dims.add(embedding.shape[1])
        if not bool(torch.isfinite(embedding).all()):
            raise ValueError(
                f"{loss_name}: the guide's embeddings of column {column} contain NaN or infinite values, so its "
                "similarities cannot decide which candidates to mask. Check the guide model (e.g. its dtype: a "
                "float16 guide can overflow) or train without `guide`."
            )
    if len(dims) > 1:
        raise ValueError(f"{loss_name}: the guide embeddings' sizes differ between columns: {sorted(dims)}.")


def embed_with_guide(
    guide: Any,
    feature: dict[str, Any],
    ranges: list[tuple[int, int]],
    chunk: Any,
    retokenize_with: Any | None,
    device: torch.device,
) -> Tensor:
    """The guide's embeddings of one column, without gradients, chunk by chunk.

    Args:
        guide: The guide SentenceTransformer.
        feature: The column as tokenized for the model (possibly length-sorted).
        ranges: ``(begin, end)`` row ranges covering the column.
        chunk: ``chunk(feature, begin, end)`` -> the rows' feature (trimmed to their own padding).
        retokenize_with: The model's tokenizer when the guide needs its own tokens (decoded text re-tokenized by
            ``guide.preprocess``), else None.
        device: Where the result goes (the model's embeddings' device).

    Returns:
        ``(rows, guide_dim)`` in the column's row order.
    """
    parts = []
    with torch.no_grad():
        for begin, end in ranges:
            rows = chunk(feature, begin, end)
            if retokenize_with is not None:
                input_ids = rows["input_ids"]
                if "cu_seq_lens_q" in rows:  # flattened: split the sequences back apart
                    flat = input_ids.reshape(-1).tolist()
                    offsets = rows["cu_seq_lens_q"].tolist()
                    input_ids = [flat[start:stop] for start, stop in zip(offsets[:-1], offsets[1:])]
                texts = retokenize_with.batch_decode(input_ids, skip_special_tokens=True)
                rows = guide.preprocess(texts)
            guide_device = guide.device
            rows = {key: value.to(guide_device) if isinstance(value, Tensor) else value for key, value in rows.items()}
            parts.append(guide(rows)["sentence_embedding"].detach().to(device))
    return torch.cat(parts)


def guide_mask(similarities: Tensor, threshold: Tensor, strategy: str, margin: float) -> Tensor:
    """Where a candidate's guide similarity exceeds the row's positive's minus the margin (CachedGISTEmbedLoss's rule).

    Args:
        similarities: Guide similarities, rows first.
        threshold: ``(rows,)`` guide similarity of each row's (lowest) positive.
        strategy: ``"absolute"`` (``> threshold - margin``) or ``"relative"`` (``> threshold - |threshold| margin``).
        margin: The margin.
    """
    threshold = threshold.reshape(-1, *([1] * (similarities.ndim - 1)))
    if strategy == "absolute":
        return similarities > threshold - margin
    return similarities > threshold - threshold.abs() * margin


def hardness_penalty(cosines: Tensor, own: Tensor, num_positives: int, mode: str, strength: float) -> Tensor:
    """sentence-transformers 6.3's hardness penalty ``strength * stop_grad(cos)`` on the query-to-document logits.

    Args:
        cosines: ``(rows, global_batch, P + N)`` cosine similarities of the rows' queries with every candidate.
        own: ``(rows,)`` global index of each row's own candidates.
        num_positives: ``P``.
        mode: ``"in_batch_negatives"`` (the other rows' candidates), ``"hard_negatives"`` (the row's own hard
            negatives) or ``"all_negatives"`` (everything but the row's own positives).
        strength: ``alpha``.

    Returns:
        The penalty, 0 where ``mode`` does not apply; added to the scaled logits (it is not temperature-scaled).
    """
    rows, num_global, num_columns = cosines.shape
    own_row = torch.zeros(rows, num_global, 1, dtype=torch.bool, device=cosines.device)
    own_row[torch.arange(rows, device=cosines.device), own] = True
    is_positive = (torch.arange(num_columns, device=cosines.device) < num_positives).view(1, 1, -1)
    if mode == "in_batch_negatives":
        applies = ~own_row.expand(rows, num_global, num_columns)
    elif mode == "hard_negatives":
        applies = own_row & ~is_positive
    else:
        applies = ~(own_row & is_positive)
    return (strength * cosines.detach()).masked_fill(~applies, 0.0)


def distillation_kl(
    student_cosines: Tensor, teacher_scores: Tensor, student_temperature: float, teacher_temperature: float
) -> Tensor:
    """``sum over rows of KL(teacher || student) * student_temperature**2`` over each row's own candidates.

    sentence-transformers' ``DistillKLDivLoss`` term (divide by the batch size for its ``batchmean``): student
    ``log_softmax(cos / s)``, teacher ``softmax(scores / t)``, both over the row's ``P + N`` own candidates.
    """
    # At least float32 (bf16 autocast cosines would round the distributions coarsely); float64 stays float64.
    dtype = torch.promote_types(student_cosines.dtype, torch.float32)
    student = torch.log_softmax(student_cosines.to(dtype) / student_temperature, dim=1)
    teacher = torch.softmax(teacher_scores.detach().to(dtype) / teacher_temperature, dim=1)
    return F.kl_div(student, teacher, reduction="sum") * student_temperature**2


__all__ = [
    "DIRECTIONS",
    "HARDNESS_MODES",
    "MARGIN_STRATEGIES",
    "PARTITION_MODES",
    "LossTargets",
    "as_targets",
    "check_direction_options",
    "check_distillation_options",
    "check_guide",
    "check_guide_embeddings",
    "check_teacher_scores",
    "distillation_kl",
    "embed_with_guide",
    "guide_mask",
    "hardness_penalty",
]
