"""CoDiEmb's order-aware STS objective: Pearson + rank-KL + PRO on the cosine scores of a batch of pairs, plus an
auxiliary InfoNCE on the pooled middle transformer layer (MidNCE).

The terms are vectorised transcriptions of the released CoDiEmb training code
(``TencentCloudADP/youtu-embedding``, ``training/CoDiEmb/train/loss.py`` and ``model.py``), which ranks with scipy on
the CPU and runs PRO as a Python loop over the batch. Here every term stays on the batch's device as a few tensor ops.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers import util
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from codiemb_st._compat import (
    Pooling,
    SentenceTransformer,
    Transformer,
    all_gather_with_grad,
    embed_columns,
    is_adaptive_layer_loss_active,
)
from codiemb_st.citation import CODIEMB_CITATION
from codiemb_st.losses import _input_checks, _length_order

logger = logging.getLogger(__name__)

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


# Keys of a model output that belong to the final layer and must not leak into the middle layer's pooling:
# ``cls_token_embeddings`` would make CLS pooling return the final layer's CLS vector.
_FINAL_LAYER_KEYS = frozenset(
    {"token_embeddings", "sentence_embedding", "cls_token_embeddings", "all_layer_embeddings"}
)


def _unwrap(model: nn.Module) -> nn.Module:
    # DDP / DataParallel (``.module``) and torch.compile (``._orig_mod``) wrap the SentenceTransformer.
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def _hidden_state_modules(model: nn.Module) -> tuple[Transformer, Pooling]:
    """The Transformer module whose hidden states MidNCE reads and the Pooling module that pools them."""
    modules = list(_unwrap(model).children())
    transformer_index = next((i for i, module in enumerate(modules) if isinstance(module, Transformer)), None)
    if transformer_index is None:
        names = [type(module).__name__ for module in modules]
        raise ValueError(
            "`mid_nce_weight` > 0 needs the hidden states of a sentence-transformers Transformer module, but the "
            f"model has none (modules: {names}). Set `mid_nce_weight=0` to train without the middle-layer InfoNCE term."
        )
    transformer = modules[transformer_index]
    config = getattr(transformer.model, "config", None)
    if config is None or not hasattr(config, "output_hidden_states"):
        raise ValueError(
            f"`mid_nce_weight` > 0 needs hidden states, but the Transformer module's model "
            f"({type(transformer.model).__name__}) has no config with `output_hidden_states`. Set `mid_nce_weight=0`."
        )
    pooling = next((module for module in modules[transformer_index + 1 :] if isinstance(module, Pooling)), None)
    if pooling is None:
        raise ValueError(
            "`mid_nce_weight` > 0 pools the middle layer with the model's Pooling module, but the model has no "
            "Pooling module after its Transformer module. Set `mid_nce_weight=0` to train without the middle-layer term."
        )
    return transformer, pooling


@contextmanager
def _hidden_states_requested(transformer: Transformer) -> Iterator[None]:
    """Make the Transformer module return all hidden states for the calls inside the block only.

    sentence-transformers' Transformer module stores ``all_layer_embeddings`` only when the model config has
    ``output_hidden_states`` on (a per-call ``output_hidden_states=True`` reaches the model but its hidden states are
    dropped), so the flag is switched on for this block and restored afterwards, also on error: ``model.encode``,
    other losses and the IR steps never keep every layer. sentence-transformers' own AdaptiveLayerLoss switches the
    same flag the same way.
    """
    config = transformer.model.config
    previous = config.output_hidden_states
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = previous


class PearsonSpearmanLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        pearson_weight: float = 2.0,
        rank_kl_weight: float = 5.0,
        pro_weight: float = 0.5,
        temperature: float = 0.05,
        gather_across_devices: bool = False,
        return_dict: bool = False,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = util.pairwise_cos_sim,
        mid_nce_weight: float = 1.0,
        mid_nce_temperature: float = 0.02,
        mid_nce_threshold: float = 1.0,
        mid_nce_layer: int | None = None,
        sort_by_length: bool = True,
    ) -> None:
        """
        CoDiEmb's order-aware loss for semantic textual similarity (STS). STS is judged by the Spearman correlation
        between predicted and gold similarities over all pairs, so instead of pushing each pair towards a target
        score, this loss scores the whole batch at once against the gold scores with three terms, computed on the
        cosine similarities ``s`` of the batch's pairs and their gold scores ``y``, plus CoDiEmb's auxiliary
        InfoNCE on a middle transformer layer:

        ``loss = pearson_weight * (1 - pearson(s, y)) + rank_kl_weight * RankKL + pro_weight * PRO
        + mid_nce_weight * MidNCE``

        - **Pearson**: ``1 - r`` with ``r`` the population Pearson correlation over the batch (Pcc-tuning).
        - **RankKL**: ``KL(P || Q)`` ("batchmean") between ``P = softmax(t / T)``, with ``t`` the gold ranks
          (descending, ties averaged) normalised to [0, 1], and ``Q = softmax(s / T)``.
        - **PRO**: a listwise loss: every pair must out-score all pairs with a lower gold score, the logits
          weighted by the label gaps (``w_j = y_k - y_j``, own weight ``max_j w_j``), divided by ``T``.
        - **MidNCE**: InfoNCE on the middle layer. The Transformer module's hidden states (a tuple that starts with
          the embedding output) are requested for this loss's own forward pass only; layer
          ``hidden_states[len(hidden_states) // 2]`` (or ``mid_nce_layer``) is pooled by the model's own Pooling
          module (same mode; prompt tokens it excludes stay excluded) and L2-normalised, giving ``a_i`` and ``b_i``
          for the two sentences. The anchors are the pairs with a raw gold score ``y_i >= mid_nce_threshold``; each
          anchor's positive is its own second sentence and its candidates are the second sentences of the whole
          batch: ``MidNCE = mean over anchors i of -log softmax_j(cos(a_i, b_j) / mid_nce_temperature)[i]``, 0 when
          the batch has no anchor. Modules after the Pooling module (Dense, Normalize) are not applied to it.

        The defaults are the weights and temperatures of the official CoDiEmb code, where the middle-layer term is on
        in every released training script (``--multi_layer_loss``, weight 1, ``--temperature 0.02``, threshold 1.0).
        Every term is vectorised on the batch's device (the official code ranks with scipy on the CPU and loops over
        the batch in Python). PRO
        compares every pair with every lower-labelled pair: on CPU its cost grows with batch size x number of
        distinct labels (near-linear for graded or binary labels), with all-distinct labels (e.g. distilled scores)
        it is quadratic; it runs in row chunks and keeps O(batch) memory for backward. The gold scores are checked
        once per batch for NaN/inf, which costs one device sync.

        Score range: the gold scores can be on any scale (0-1, 0-5, binary). The Pearson term is invariant to any
        increasing affine map of the gold scores and the RankKL term to any strictly increasing map; PRO uses the raw
        label gaps as logit weights, so rescaling the labels by ``c`` sharpens its softmax by ``c``.

        Degenerate batches: when all gold scores in a batch are equal (common with binary labels), the Pearson and
        PRO terms are undefined and contribute 0; RankKL is defined (uniform target) and pulls the predicted
        similarities together, as in the official code. Equal predicted similarities (a collapsed model) leave
        ``r`` undefined too: the Pearson term is then 1 without gradient (the official code gives NaN). A batch
        without MidNCE anchors gets 0 for that term (with a graph, never NaN). A batch with fewer than 2 pairs (e.g. a
        1-row last batch without ``dataloader_drop_last``) gives a loss of 0 and logs a warning. NaN or infinite gold
        scores raise a ``ValueError``.

        Middle-layer threshold: ``mid_nce_threshold`` is compared with the raw gold scores, as in the official code,
        so its meaning depends on the label scale. With 0-1 or binary labels the default 1.0 makes only the
        top-scored (positive) pairs anchors; with 0-5 labels (STS-B) or 0-2 (QBQTC) nearly every pair is an anchor
        (82% of the STSBenchmark test pairs score >= 1.0), so the term then also pulls weakly related pairs (1-2 of 5)
        together. Keep the official 1.0 to reproduce the paper, or set
        the threshold for your scale (e.g. 4.0 on 0-5 labels). Cost: the per-column forward passes keep every
        layer's hidden states until the loss is computed; they are saved for backward anyway, so the extra memory is
        small (see the README for measured numbers).

        Args:
            model: SentenceTransformer model.
            pearson_weight: Weight of the Pearson term ``1 - r``.
            rank_kl_weight: Weight of the rank-KL term.
            pro_weight: Weight of the PRO term.
            temperature: Temperature ``T`` of the rank-KL softmaxes and of the PRO logits.
            gather_across_devices: If True, gather the similarities and gold scores of all ranks (with gradients)
                before computing the loss, so the correlation terms are over the global batch; the middle-layer
                embeddings are gathered too, so the MidNCE anchors and candidates are the global batch's. Every rank
                then computes the same global loss; with DDP's gradient averaging the parameter gradients equal
                those of one process on the global batch. Every rank must have the same per-device batch size (the default
                ``even_batches`` of accelerate, or ``dataloader_drop_last=True``). The official code computes the STS
                loss per device (no gathering), hence the default False.
            return_dict: If True, return the weighted terms as a dict (``pearson_loss``, ``rank_kl_loss``,
                ``pro_loss``, ``mid_nce_loss``, terms with weight 0 left out); ``SentenceTransformerTrainer`` sums
                them and logs each one. If False, return their sum.
            similarity_fct: Pairwise similarity between the two columns' embeddings. Default ``util.pairwise_cos_sim``
                (the method is defined on cosine similarity).
            mid_nce_weight: Weight of the middle-layer InfoNCE term. 0 switches it off: the loss is then the
                three-term loss exactly and no hidden states are requested. Needs a sentence-transformers Transformer
                module that returns hidden states, followed by a Pooling module.
            mid_nce_temperature: Temperature of the middle-layer InfoNCE (official 0.02).
            mid_nce_threshold: Pairs whose raw gold score is at least this are the InfoNCE anchors (official 1.0;
                see the threshold note above).
            mid_nce_layer: Index into the hidden-states tuple (0 = embedding output, ``len - 1`` = last layer;
                negative indices count from the end). Default None: ``len(hidden_states) // 2``, as in the official
                code.
            sort_by_length: If True (default), embed each column in length-sorted chunks (see "Length-aware
                embedding" below). The loss and its gradients do not depend on it (up to floating-point rounding); set
                it to False to embed each column in one forward pass in its own row order, as sentence-transformers'
                losses do.

        Length-aware embedding:
            A column is padded to its longest text, so on short, uneven STS pairs most of what the encoder computes
            is padding. With ``sort_by_length=True`` each column's rows are sorted by real (attention-mask) length,
            shortest first, and cut into chunks whose boundaries minimise the padded tokens (a boundary must save more
            padding than the cost of a forward call); each chunk is embedded with gradients at the width of its own
            longest text, and its middle layer (MidNCE) is pooled from the same forward pass. The embeddings are put
            back in the original order before scoring. Leading (left) padding of decoder embedders is trimmed only
            for models with rotary positions, with explicit ``position_ids`` that keep every token's position in the
            full-width column. A column that needs no sorting and fits one chunk is embedded exactly as with
            ``sort_by_length=False``, as are batches under DDP (whose forward calls must match across ranks), inside
            ``AdaptiveLayerLoss`` (which caches the per-column feature dicts) and flattened or multimodal inputs.

        References:
            - CoDiEmb: https://arxiv.org/abs/2508.11442 (official code: https://github.com/TencentCloudADP/youtu-embedding)
            - Pcc-tuning: Zhang & Li, 2024. Pcc-tuning: Breaking the Contrastive Learning Ceiling in Semantic Textual
              Similarity.
            - PRO: Peng et al., 2024. Large Language Model based Long-tail Query Rewriting in Taobao Search.

        Requirements:
            - Pairs of texts with a graded (or binary) gold similarity score, several distinct scores per batch.
            - For the middle-layer term (``mid_nce_weight > 0``): a Transformer module followed by a Pooling module,
              encoder or decoder backbone.

        Inputs:
            +--------------------------------+-------------------------------------------------------------+
            | Texts                          | Labels                                                      |
            +================================+=============================================================+
            | (sentence_A, sentence_B) pairs | float similarity score (raw scale: MidNCE anchors are pairs |
            |                                | scored ``>= mid_nce_threshold``)                            |
            +--------------------------------+-------------------------------------------------------------+

        Relations:
            - :class:`~sentence_transformers.sentence_transformer.losses.CoSENTLoss` also ranks pairs by their gold
              score (pairwise); this loss adds the correlation and listwise rank terms of CoDiEmb.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

                from codiemb_st import PearsonSpearmanLoss

                model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                train_dataset = Dataset.from_dict({
                    "sentence1": ["It's nice weather outside today.", "He drove to work.", "A cat sleeps."],
                    "sentence2": ["It's so sunny.", "She walked to the store.", "The stock market fell."],
                    "score": [4.6, 1.2, 0.0],
                })
                loss = PearsonSpearmanLoss(model)

                trainer = SentenceTransformerTrainer(
                    model=model,
                    train_dataset=train_dataset,
                    loss=loss,
                )
                trainer.train()
        """
        super().__init__()
        weights = {
            "pearson_weight": pearson_weight,
            "rank_kl_weight": rank_kl_weight,
            "pro_weight": pro_weight,
            "mid_nce_weight": mid_nce_weight,
        }
        for name, weight in weights.items():
            _check_real(name, weight)
            if not (math.isfinite(weight) and weight >= 0):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {weight!r}.")
        if not any(weight > 0 for weight in weights.values()):
            raise ValueError(
                "At least one of `pearson_weight`, `rank_kl_weight`, `pro_weight`, `mid_nce_weight` must be > 0; "
                "all are 0, so the loss would be constant."
            )
        for name, value in (("temperature", temperature), ("mid_nce_temperature", mid_nce_temperature)):
            _check_real(name, value)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"`{name}` must be a finite number > 0, got {value!r}.")
        _check_real("mid_nce_threshold", mid_nce_threshold)
        if not math.isfinite(mid_nce_threshold):
            raise ValueError(f"`mid_nce_threshold` must be a finite number, got {mid_nce_threshold!r}.")
        if mid_nce_layer is not None and (isinstance(mid_nce_layer, bool) or not isinstance(mid_nce_layer, int)):
            raise TypeError(f"`mid_nce_layer` must be an int or None, got {type(mid_nce_layer).__name__}.")
        if not isinstance(gather_across_devices, bool):
            raise TypeError(f"`gather_across_devices` must be a bool, got {type(gather_across_devices).__name__}.")
        if not isinstance(sort_by_length, bool):
            raise TypeError(f"`sort_by_length` must be a bool, got {type(sort_by_length).__name__}.")
        if not isinstance(return_dict, bool):
            raise TypeError(f"`return_dict` must be a bool, got {type(return_dict).__name__}.")
        _input_checks.check_inverse_temperature(type(self).__name__, temperature)
        _input_checks.check_inverse_temperature(type(self).__name__, mid_nce_temperature, "mid_nce_temperature")
        if not callable(similarity_fct):
            raise TypeError(f"`similarity_fct` must be callable, got {type(similarity_fct).__name__}.")

        self.model = model
        self.pearson_weight = float(pearson_weight)
        self.rank_kl_weight = float(rank_kl_weight)
        self.pro_weight = float(pro_weight)
        self.temperature = float(temperature)
        self.gather_across_devices = gather_across_devices
        self.return_dict = return_dict
        self.similarity_fct = similarity_fct
        self.mid_nce_weight = float(mid_nce_weight)
        self.mid_nce_temperature = float(mid_nce_temperature)
        self.mid_nce_threshold = float(mid_nce_threshold)
        self.mid_nce_layer = mid_nce_layer
        self.sort_by_length = sort_by_length
        if model is not None and self.mid_nce_weight > 0:
            # Fail before training starts: the model can expose hidden states and the layer exists.
            transformer, _ = _hidden_state_modules(model)
            num_layers = getattr(transformer.model.config, "num_hidden_layers", None)
            if isinstance(num_layers, int) and not isinstance(num_layers, bool):
                self._middle_layer_index(num_layers + 1)

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None
    ) -> Tensor | dict[str, Tensor]:
        sentence_features = list(sentence_features)
        if (zero := _input_checks.sts_batch_fallback(self, sentence_features, labels)) is not None:
            return zero
        if len(sentence_features) != 2:
            raise ValueError(
                f"{self.__class__.__name__} expects exactly 2 text columns (sentence1, sentence2) followed by a score "
                f"column, but got {len(sentence_features)} text columns. Remove or reorder the extra columns."
            )
        if self.mid_nce_weight == 0:
            # Exactly the three-term path: no hidden states requested.
            if self._sorts(sentence_features):
                embeddings = [self._embed_sorted(features)[0] for features in sentence_features]
            else:
                embeddings = embed_columns(self.model, sentence_features)
            return self.compute_loss_from_embeddings(embeddings, labels)
        embeddings, middle_embeddings = self.embed_with_middle_layer(sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, middle_embeddings=middle_embeddings)

    def embed_with_middle_layer(self, sentence_features: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Embed each column, returning its final embeddings and its pooled middle-layer embeddings.

        One forward pass per column (as ``embed_columns`` does for two columns), with the hidden states requested for
        that pass only. The middle layer is pooled by the model's Pooling module with the column's own features
        (attention mask, ``prompt_length``), so it is pooled exactly like the final layer. As with the model's other
        outputs, the hidden states stay in the column's feature dict (``all_layer_embeddings``) until the batch is
        dropped; autograd keeps them for backward anyway.

        Args:
            sentence_features: One tokenized feature dict per column.

        Returns:
            ``(final, middle)``: per column, the (batch_size, dim) sentence embeddings and the unnormalised pooled
            middle-layer embeddings.
        """
        transformer, pooling = _hidden_state_modules(self.model)
        if self._sorts(sentence_features):
            pairs = [self._embed_sorted(features, transformer, pooling) for features in sentence_features]
            return [final for final, _ in pairs], [middle for _, middle in pairs]
        final, middle = [], []
        for features in sentence_features:
            final_embeddings, middle_embeddings = self._embed_with_middle(features, transformer, pooling)
            final.append(final_embeddings)
            middle.append(middle_embeddings)
        return final, middle

    def _sorts(self, sentence_features: list[dict[str, Tensor]]) -> bool:
        """Whether this batch is embedded in length-sorted chunks (see "Length-aware embedding" in ``__init__``)."""
        if not self.sort_by_length:
            return False
        model = getattr(self.model, "_orig_mod", self.model)
        if isinstance(model, DistributedDataParallel) or is_adaptive_layer_loss_active(self.model):
            return False
        return all(_length_order.real_lengths(features) is not None for features in sentence_features)

    def _embed_sorted(
        self, features: dict[str, Tensor], transformer: Transformer | None = None, pooling: Pooling | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """One column's final (and, given ``transformer`` and ``pooling``, middle-layer) embeddings, computed in
        length-sorted chunks and returned in the column's own row order."""
        sorted_features, order = _length_order.sort_by_length(features)
        ranges = _length_order.column_chunks(sorted_features)
        if order is None and len(ranges) == 1:  # nothing to gain: the plain call
            chunks = [features]
        else:
            keep_positions = _length_order.keeps_positions_with_position_ids(self.model)
            chunks = [
                _length_order.chunk_feature(sorted_features, begin, end, keep_positions) for begin, end in ranges
            ]
        finals, middles = [], []
        for chunk in chunks:
            if transformer is None:
                finals.append(self.model(chunk)["sentence_embedding"])
            else:
                final, middle = self._embed_with_middle(chunk, transformer, pooling)
                finals.append(final)
                middles.append(middle)
        final = _length_order.restore_order(torch.cat(finals), order)
        middle = _length_order.restore_order(torch.cat(middles), order) if middles else None
        return final, middle

    def _embed_with_middle(
        self, features: dict[str, Tensor], transformer: Transformer, pooling: Pooling
    ) -> tuple[Tensor, Tensor]:
        """One forward pass with hidden states: the final embeddings and the pooled middle layer."""
        with _hidden_states_requested(transformer):
            output = self.model(features)
        # Read, not popped: wrappers such as MatryoshkaLoss and AdaptiveLayerLoss cache this very dict and read
        # ``all_layer_embeddings`` from it again on their next call.
        hidden_states = output.get("all_layer_embeddings")
        if hidden_states is None:
            raise ValueError(
                f"`mid_nce_weight` > 0 needs hidden states, but the Transformer module "
                f"({type(transformer.model).__name__}) returned none with `output_hidden_states=True`. "
                "Set `mid_nce_weight=0` to train without the middle-layer InfoNCE term."
            )
        layer_features = {key: value for key, value in output.items() if key not in _FINAL_LAYER_KEYS}
        layer_features["token_embeddings"] = hidden_states[self._middle_layer_index(len(hidden_states))]
        return output["sentence_embedding"], pooling(layer_features)["sentence_embedding"]

    def _middle_layer_index(self, num_hidden_states: int) -> int:
        if self.mid_nce_layer is None:
            return num_hidden_states // 2
        if not -num_hidden_states <= self.mid_nce_layer < num_hidden_states:
            raise ValueError(
                f"`mid_nce_layer`={self.mid_nce_layer} is out of range: the Transformer module returns "
                f"{num_hidden_states} hidden states (the embedding output and {num_hidden_states - 1} layers), so it "
                f"must be in [{-num_hidden_states}, {num_hidden_states - 1}]."
            )
        return self.mid_nce_layer

    def compute_loss_from_embeddings(
        self,
        embeddings: list[Tensor],
        labels: Tensor | None,
        middle_embeddings: list[Tensor] | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Compute the loss from the embeddings of the two columns.

        Args:
            embeddings: Two tensors of shape (batch_size, dim): the embeddings of sentence1 and sentence2.
            labels: Gold similarity scores, one per pair.
            middle_embeddings: The two columns' pooled middle-layer embeddings for the MidNCE term (see
                ``embed_with_middle_layer``); None leaves the term out.

        Returns:
            The weighted sum of the terms, or the weighted terms as a dict when ``return_dict`` is True.
        """
        if len(embeddings) != 2:
            raise ValueError(f"{self.__class__.__name__} expects embeddings of 2 columns, got {len(embeddings)}.")
        scores = self.similarity_fct(embeddings[0], embeddings[1])
        return self.compute_loss_from_scores(scores, labels, middle_embeddings=middle_embeddings)

    def compute_loss_from_scores(
        self, scores: Tensor, labels: Tensor | None, middle_embeddings: list[Tensor] | None = None
    ) -> Tensor | dict[str, Tensor]:
        """Compute the loss from the pairs' predicted similarities (gathered across devices if enabled).

        Args:
            scores: 1-D predicted similarity of each pair.
            labels: Gold similarity scores, one per pair.
            middle_embeddings: The two columns' pooled middle-layer embeddings, (batch_size, dim) each, for the
                MidNCE term; None (or ``mid_nce_weight=0``) leaves the term out.

        Returns:
            The weighted sum of the terms, or the weighted terms as a dict when ``return_dict`` is True.
        """
        _input_checks.check_sts_labels(type(self).__name__, labels)
        if labels is None:
            raise ValueError(
                f"{self.__class__.__name__} needs a gold similarity per pair, but the batch has no labels. "
                "Give the dataset a float 'score' (or 'label') column after the two text columns."
            )
        if labels.numel() != scores.numel():
            raise ValueError(
                f"{self.__class__.__name__} expects {scores.numel()} labels (one per pair), but got "
                f"{labels.numel()} labels with shape {tuple(labels.shape)}."
            )
        scores = scores.reshape(-1)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        labels = labels.reshape(-1).to(device=scores.device, dtype=scores.dtype)

        if middle_embeddings is not None and self.mid_nce_weight > 0:
            if len(middle_embeddings) != 2:
                raise ValueError(
                    f"{self.__class__.__name__} expects middle-layer embeddings of 2 columns, "
                    f"got {len(middle_embeddings)}."
                )
            middle_embeddings = [
                embedding.float() if embedding.dtype in (torch.float16, torch.bfloat16) else embedding
                for embedding in middle_embeddings
            ]
        else:
            middle_embeddings = None

        if self.gather_across_devices:
            scores = all_gather_with_grad(scores)
            labels = all_gather_with_grad(labels)
            if middle_embeddings is not None:
                middle_embeddings = [all_gather_with_grad(embedding) for embedding in middle_embeddings]

        # One host sync per batch. Checked on the gathered labels so that every rank raises together.
        if not bool(torch.isfinite(labels).all()):
            raise ValueError(
                f"{self.__class__.__name__} got NaN or infinite gold scores; clean or drop those rows of the score column."
            )

        terms = self._weighted_terms(scores, labels, middle_embeddings)
        if not terms:
            raise ValueError(
                f"{self.__class__.__name__} has only the middle-layer term switched on, which needs the middle-layer "
                "embeddings: call the loss on the features (forward) or pass `middle_embeddings`."
            )
        if self.return_dict:
            return terms
        return torch.stack(list(terms.values())).sum()

    def _weighted_terms(
        self, scores: Tensor, labels: Tensor, middle_embeddings: list[Tensor] | None
    ) -> dict[str, Tensor]:
        weighted = [
            ("pearson_loss", self.pearson_weight, lambda: pearson_loss(scores, labels)),
            ("rank_kl_loss", self.rank_kl_weight, lambda: rank_kl_loss(scores, labels, self.temperature)),
            ("pro_loss", self.pro_weight, lambda: pro_loss(scores, labels, self.temperature)),
        ]
        if middle_embeddings is not None:
            weighted.append(
                (
                    "mid_nce_loss",
                    self.mid_nce_weight,
                    lambda: mid_nce_loss(
                        *middle_embeddings, labels, self.mid_nce_temperature, self.mid_nce_threshold
                    ).to(scores.dtype),
                )
            )
        if scores.numel() < 2:
            logger.warning(
                "%s got a batch of %d pair(s); correlations need at least 2, so this batch contributes 0. "
                "Set `dataloader_drop_last=True` to drop a short last batch.",
                self.__class__.__name__,
                scores.numel(),
            )
            # Still attached to the graph, so DDP and the trainer see an ordinary (zero) loss.
            return {name: scores.sum() * 0.0 for name, weight, _ in weighted if weight > 0}
        return {name: weight * term() for name, weight, term in weighted if weight > 0}

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "pearson_weight": self.pearson_weight,
            "rank_kl_weight": self.rank_kl_weight,
            "pro_weight": self.pro_weight,
            "temperature": self.temperature,
            "gather_across_devices": self.gather_across_devices,
            "similarity_fct": getattr(self.similarity_fct, "__name__", repr(self.similarity_fct)),
            "mid_nce_weight": self.mid_nce_weight,
            "mid_nce_temperature": self.mid_nce_temperature,
            "mid_nce_threshold": self.mid_nce_threshold,
            "mid_nce_layer": self.mid_nce_layer,
            "sort_by_length": self.sort_by_length,
        }

    @property
    def citation(self) -> str:
        return CODIEMB_CITATION


def _check_term_inputs(scores: Tensor, labels: Tensor) -> None:
    if scores.ndim != 1 or labels.shape != scores.shape:
        raise ValueError(
            f"Expected 1-D `scores` and `labels` of the same shape, got {tuple(scores.shape)} and {tuple(labels.shape)}."
        )
    if scores.numel() < 2:
        raise ValueError(f"The correlation terms need at least 2 pairs, got {scores.numel()}.")


def _check_real(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{name}` must be a number, got {type(value).__name__}.")
