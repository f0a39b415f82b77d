"""The pure tensor math of CoDiEmb's STS terms: Pearson, rank-KL, PRO (each with its hand-written backward pass)
and the middle-layer InfoNCE (MidNCE).

Vectorised transcriptions of the released CoDiEmb training code (``TencentCloudADP/youtu-embedding``,
``training/CoDiEmb/train/loss.py``), which ranks with scipy on the CPU and runs PRO as a Python loop over the batch.
Here every term stays on the batch's device as a few tensor ops. The module that combines them is
:class:`codiemb_st.losses.PearsonSpearmanLoss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Label gaps at or below this do not order two pairs in PRO (the official code's ``eps``).
PRO_EPS = 1e-8


def average_ranks(values: Tensor) -> Tensor:
    """0-based ranks of ``values`` in descending order, ties sharing their average rank.

    Equal to ``scipy.stats.rankdata(-values, method="average") - 1``, computed with one sort and two
    ``searchsorted`` calls, so it stays on the tensor's device without a host sync.

    Args:
        values: 1-D tensor.

    Returns:
        Tensor of the same shape (and floating dtype, float32 for integer input): the largest value gets 0.
    """
    sorted_values = values.sort().values
    below = torch.searchsorted(sorted_values, values, right=False)
    at_or_below = torch.searchsorted(sorted_values, values, right=True)
    dtype = values.dtype if values.is_floating_point() else torch.float32
    above = (values.numel() - at_or_below).to(dtype)
    return above + (at_or_below - below - 1).to(dtype) / 2


def pearson_loss(scores: Tensor, labels: Tensor) -> Tensor:
    """``1 - r`` with ``r`` the population Pearson correlation of ``scores`` and ``labels``.

    Where ``r`` is undefined the term gives no gradient: 0 when all labels are equal (as the official code), and
    ``1 - 0`` when all scores are equal (the official code gives NaN there).

    Args:
        scores: 1-D predicted similarities (at least 2).
        labels: 1-D gold scores, same shape and dtype.

    Returns:
        Scalar tensor.
    """
    _check_term_inputs(scores, labels)
    return _PearsonLoss.apply(scores, labels)


class _PearsonLoss(torch.autograd.Function):
    # One autograd node with the closed-form gradient: d(1 - r)/ds = r * a / |a|^2 - b / (|a| |b|), with a and b the
    # centred scores and labels (the 1/n factors of the population moments cancel).

    @staticmethod
    def forward(ctx, scores: Tensor, labels: Tensor) -> Tensor:
        centred_scores = scores - scores.mean()
        centred_labels = labels - labels.mean()
        scores_norm = centred_scores.norm()
        labels_norm = centred_labels.norm()
        labels_vary = labels.amax() > labels.amin()
        defined = labels_vary & (scores.amax() > scores.amin())
        denominator = (scores_norm * labels_norm).clamp_min(torch.finfo(scores.dtype).tiny)
        correlation = torch.where(defined, (centred_scores @ centred_labels) / denominator, 0.0)
        gradient = correlation * centred_scores / scores_norm.square().clamp_min(torch.finfo(scores.dtype).tiny)
        gradient = torch.where(defined, gradient - centred_labels / denominator, 0.0)
        ctx.save_for_backward(gradient)
        return torch.where(labels_vary, 1 - correlation, 0.0)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None]:
        (gradient,) = ctx.saved_tensors
        return grad_output * gradient, None


def rank_kl_loss(scores: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """KL(P || Q) with P = softmax(normalised gold ranks / T) and Q = softmax(scores / T), "batchmean" reduction.

    The gold ranks are descending with ties averaged (``r_i``, 0-based) and normalised to ``t_i = (n-1-r_i)/(n-1)``,
    so the term depends on the order of the labels only. All labels equal gives a uniform P.

    Args:
        scores: 1-D predicted similarities (at least 2).
        labels: 1-D gold scores, same shape.
        temperature: softmax temperature T for both distributions.

    Returns:
        Scalar tensor.
    """
    _check_term_inputs(scores, labels)
    return _RankKLLoss.apply(scores, labels, temperature)


class _RankKLLoss(torch.autograd.Function):
    # "batchmean" on a 1-D input divides by n, as in the official code; the gradient is (Q - P) / (n T).

    @staticmethod
    def forward(ctx, scores: Tensor, labels: Tensor, temperature: float) -> Tensor:
        n = labels.numel()
        normalised_rank = (n - 1 - average_ranks(labels)) / (n - 1)
        log_target = torch.log_softmax(normalised_rank.to(scores.dtype) / temperature, dim=0)
        log_predicted = torch.log_softmax(scores / temperature, dim=0)
        target = log_target.exp()
        ctx.save_for_backward((log_predicted.exp() - target) / (n * temperature))
        return (target * (log_target - log_predicted)).sum() / n

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:
        (gradient,) = ctx.saved_tensors
        return grad_output * gradient, None, None


def pro_loss(
    scores: Tensor,
    labels: Tensor,
    temperature: float,
    eps: float = PRO_EPS,
    group_tied_labels: bool | None = None,
    chunk_elements: int | None = None,
) -> Tensor:
    """PRO listwise loss with label-gap weights, as in the official CoDiEmb code.

    For every pair k with a strictly lower-labelled pair somewhere in the batch (gap > ``eps``), the candidates are
    k itself and every pair j with ``y_k - y_j > eps``; the logits are ``w * s / T`` with ``w_j = y_k - y_j`` and
    ``w_k = max_j w_j = y_k - min(y)``, and ``l_k = -log softmax(...)[k]``. The loss is the mean of ``l_k`` over those
    pairs, 0 when there are none (all labels equal). The weights are raw label gaps, so unlike the Pearson and
    rank-KL terms this term depends on the label scale.

    Cost: the k x j logit matrix is inherently quadratic, but its row k depends on k only through ``y_k`` (the own
    logit is handled apart), so pairs with tied labels share one row. With ``group_tied_labels`` the matrix has one
    row per distinct label (``torch.unique``), which makes graded labels (binary, 0-5, STS-B's 70 values) close to
    linear in the batch size; all-distinct labels stay quadratic. ``torch.unique`` needs a device sync on
    accelerators, so by default rows are grouped on CPU only and accelerators use one row per pair. The matrix is
    built ``chunk_elements`` entries at a time, and only O(batch) values are kept for backward (which recomputes the
    matrix chunk by chunk), so memory stays bounded for large gathered batches.

    Args:
        scores: 1-D predicted similarities (at least 2).
        labels: 1-D gold scores, same shape.
        temperature: logit temperature T.
        eps: label gaps at or below ``eps`` do not order two pairs.
        group_tied_labels: one logit row per distinct label (True), per pair (False), or decide by device (None).
        chunk_elements: matrix entries computed at a time (default 2**20 on CPU, 2**26 elsewhere).

    Returns:
        Scalar tensor.
    """
    _check_term_inputs(scores, labels)
    if scores.dtype in (torch.float16, torch.bfloat16):
        scores = scores.float()
    on_cpu = labels.device.type == "cpu"
    if group_tied_labels is None:
        group_tied_labels = on_cpu
    if chunk_elements is None:
        chunk_elements = 2**20 if on_cpu else 2**26
    return _ProLoss.apply(scores, labels.to(scores.dtype), temperature, eps, group_tied_labels, chunk_elements)


# exp of inputs that underflow takes a slow path on CPU (10-30x slower per element), so shifted logits are clamped
# here: a term below e^-80 of its row's largest term is far below float32 resolution, and e^-80 is a normal float.
_EXP_FLOOR = -80.0


class _ProLoss(torch.autograd.Function):
    """PRO as one autograd node with a hand-written, chunked backward.

    With logits ``c = s / T``, rows ``r`` (one per distinct label, or per pair) and the row log-sum-exp over the
    lower-labelled pairs ``R_r = log sum_{j: y_r - y_j > eps} exp((y_r - y_j) c_j)`` (``-inf`` for a row without
    any), pair k's loss is ``l_k = logaddexp(o_k, R_row(k)) - o_k`` with own logit ``o_k = (y_k - min y) c_k``. The
    gradient has an own part, ``(sigma_k - 1) (y_k - min y)`` with ``sigma_k = exp(o_k - logaddexp(...))``, and a
    row part, ``sum_r g_r softmax_r(j) (y_r - y_j)`` with row weights ``g_r = sum_{k in row r} (1 - sigma_k)``; both
    over the number of valid pairs and T. The matrix is processed in chunks of rows. On CPU with grouped rows and
    several chunks, rows and columns are ascending and each chunk stops at the last column its largest row label
    reaches (read on the host).
    """

    @staticmethod
    def forward(ctx, scores, labels, temperature, eps, group_tied_labels, chunk_elements):
        logits = scores / temperature
        gap_to_lowest = labels - labels.amin()
        has_lower = gap_to_lowest > eps
        own_logit = gap_to_lowest * logits
        if group_tied_labels:
            row_labels, row_of_pair = torch.unique(labels, return_inverse=True)  # ascending
        else:
            row_labels, row_of_pair = labels, None
        chunk_rows = max(1, chunk_elements // labels.numel())
        trim_columns = group_tied_labels and labels.device.type == "cpu" and chunk_rows < row_labels.numel()
        if trim_columns:
            column_labels, order = labels.sort()
            column_logits = logits[order]
        else:
            column_labels, order, column_logits = labels, None, logits

        chunks, row_parts = [], []
        for start in range(0, row_labels.numel(), chunk_rows):
            stop = min(start + chunk_rows, row_labels.numel())
            width = int((row_labels[stop - 1] - column_labels > eps).sum()) if trim_columns else labels.numel()
            chunks.append((start, stop, width))
            if width == 0:
                row_parts.append(logits.new_full((stop - start,), -torch.inf))
                continue
            gaps = row_labels[start:stop, None] - column_labels[None, :width]
            is_lower = gaps > eps
            lower_logits = gaps.mul_(column_logits[None, :width])
            # A row without lower labels has max -inf and sum 0: its log-sum-exp is -inf (no term, no gradient).
            row_max = lower_logits.masked_fill(~is_lower, -torch.inf).amax(dim=1, keepdim=True)
            total = lower_logits.sub_(row_max).clamp_(_EXP_FLOOR, 0.0).exp_().mul_(is_lower).sum(dim=1)
            row_parts.append(row_max.squeeze(1) + total.log())
        row_logsumexp = row_parts[0] if len(row_parts) == 1 else torch.cat(row_parts)

        pair_logsumexp = row_logsumexp if row_of_pair is None else row_logsumexp[row_of_pair]
        combined = torch.logaddexp(own_logit, pair_logsumexp)
        count = has_lower.sum().clamp_min(1).to(logits.dtype)
        loss = (combined - own_logit).masked_fill(~has_lower, 0.0).sum() / count

        if ctx.needs_input_grad[0]:
            scale = count * temperature
            own_share = (own_logit - combined).exp()  # sigma_k: softmax weight of the pair's own logit
            own_gradient = ((own_share - 1) * gap_to_lowest).masked_fill_(~has_lower, 0.0).div_(scale)
            row_weight = (1 - own_share).masked_fill_(~has_lower, 0.0).div_(scale)
            if row_of_pair is not None:
                row_weight = row_weight.new_zeros(row_labels.shape).index_add_(0, row_of_pair, row_weight)
            ctx.save_for_backward(
                row_labels, column_labels, column_logits, order, row_logsumexp, row_weight, own_gradient
            )
            ctx.eps, ctx.chunks = eps, chunks
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output):
        row_labels, column_labels, column_logits, order, row_logsumexp, row_weight, own_gradient = ctx.saved_tensors
        column_gradient = torch.zeros_like(column_logits)
        for start, stop, width in ctx.chunks:
            if width == 0:
                continue
            gaps = row_labels[start:stop, None] - column_labels[None, :width]
            is_lower = gaps > ctx.eps
            # softmax_r(j) * (y_r - y_j), recomputed from the saved row log-sum-exp.
            weights = (gaps * column_logits[None, :width]).sub_(row_logsumexp[start:stop, None])
            weights = weights.clamp_(_EXP_FLOOR, 0.0).exp_().mul_(is_lower).mul_(gaps)
            column_gradient[:width] += row_weight[start:stop] @ weights
        if order is None:
            gradient = own_gradient + column_gradient
        else:
            gradient = own_gradient.index_add(0, order, column_gradient)
        return grad_output * gradient, None, None, None, None, None


def mid_nce_loss(
    embeddings1: Tensor, embeddings2: Tensor, labels: Tensor, temperature: float, threshold: float
) -> Tensor:
    """CoDiEmb's auxiliary STS InfoNCE (L_MidNCE) on given (middle-layer) embeddings of the pairs.

    Both sides are L2-normalised; the anchors are the pairs whose raw gold score is ``>= threshold``; anchor ``i``'s
    positive is its own second sentence and its candidates are the second sentences of all pairs (in-batch
    negatives), so ``l_i = -log softmax(cos(a_i, b_j) / T over j)[i]``. The loss is the mean of ``l_i`` over the
    anchors, and 0 (still attached to the graph, so DDP and the trainer see an ordinary loss) when there is none.
    Computed for every row and masked, so there is no host sync and no data-dependent branch.

    Args:
        embeddings1: (batch_size, dim) embeddings of the first sentences.
        embeddings2: (batch_size, dim) embeddings of the second sentences.
        labels: 1-D gold scores on their raw scale, one per pair.
        temperature: InfoNCE temperature T (the official 0.02).
        threshold: pairs with a gold score at or above it are anchors (the official 1.0, on the raw label scale).

    Returns:
        Scalar tensor.
    """
    if embeddings1.ndim != 2 or embeddings2.shape != embeddings1.shape or labels.shape != embeddings1.shape[:1]:
        raise ValueError(
            "Expected two (batch_size, dim) embedding tensors of the same shape and 1-D labels of length batch_size, "
            f"got {tuple(embeddings1.shape)}, {tuple(embeddings2.shape)} and {tuple(labels.shape)}."
        )
    logits = F.normalize(embeddings1, dim=-1) @ F.normalize(embeddings2, dim=-1).T / temperature
    targets = torch.arange(logits.shape[0], device=logits.device)
    per_pair = F.cross_entropy(logits, targets, reduction="none")
    anchors = labels >= threshold
    return torch.where(anchors, per_pair, 0.0).sum() / anchors.sum().clamp_min(1).to(per_pair.dtype)


def _check_term_inputs(scores: Tensor, labels: Tensor) -> None:
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"Expected 1-D `scores` and `labels` of the same shape, got {tuple(scores.shape)} and {tuple(labels.shape)}."
        )
    if scores.numel() < 2:
        raise ValueError(f"The correlation terms need at least 2 pairs, got {scores.numel()}.")
