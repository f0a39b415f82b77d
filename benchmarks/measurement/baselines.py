"""Reference implementations the benchmarks measure against (transcriptions of released code, kept as released).

Example:
    ::

        from measurement.baselines import official_sts_loss_loop

        loss = official_sts_loss_loop(scores, labels)  # the CoDiEmb STS loss as released, for timing comparisons
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch


def official_sts_loss_loop(
    scores: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05, weights: tuple = (2.0, 5.0, 0.5)
) -> torch.Tensor:
    """The official CoDiEmb STS loss as released (scipy ranks on the CPU, PRO as a Python loop over k).

    Args:
        scores: predicted cosine scores, shape ``(n,)``.
        labels: gold scores, shape ``(n,)``.
        temperature: softmax temperature of the Rank-KL and PRO terms.
        weights: weights of the Pearson, Rank-KL and PRO terms.

    Returns:
        The weighted loss (a scalar tensor).
    """
    import torch
    import torch.nn.functional as F
    from scipy.stats import rankdata

    # Pearson (returns 0 for constant labels)
    if labels.min() == labels.max():
        pearson = torch.zeros((), device=scores.device)
    else:
        mean_x, mean_y = scores.mean(), labels.mean()
        var_x, var_y = torch.var(scores, unbiased=False), torch.var(labels, unbiased=False)
        pearson = 1 - torch.mean((scores - mean_x) * (labels - mean_y)) / (torch.sqrt(var_x) * torch.sqrt(var_y))

    # Rank-KL: average ranks from scipy on the CPU
    n = labels.numel()
    ranks = torch.from_numpy(rankdata(-labels.cpu().float().numpy(), method="average") - 1).to(labels.device)
    ideal = (n - 1 - ranks).float() / (n - 1)
    rank_kl = F.kl_div(
        F.log_softmax(scores / temperature, dim=0), F.softmax(ideal / temperature, dim=0), reduction="batchmean"
    )

    # PRO: a Python loop over the sorted batch
    logits = scores / temperature
    order = torch.argsort(labels, descending=True)
    y_sorted, x_sorted = labels[order], logits[order]
    total, count = 0.0, 0
    for k in range(n - 1):
        tail_y, tail_x = y_sorted[k + 1 :], x_sorted[k + 1 :]
        mask = (y_sorted[k] - tail_y) > 1e-8
        if not mask.any():
            continue
        gaps = y_sorted[k] - tail_y[mask]
        row = torch.cat([(x_sorted[k] * gaps.max()).unsqueeze(0), tail_x[mask] * gaps])
        total = total + F.log_softmax(row, dim=0)[0]
        count += 1
    pro = -total / count if count else torch.zeros((), device=scores.device)
    return weights[0] * pearson + weights[1] * rank_kl + weights[2] * pro


def naive_multi_positive_infonce(model: Any, num_positives: int, scale: float) -> Callable[[list[dict], Any], Any]:
    """Multi-positive InfoNCE the straightforward way: every column encoded once with its graph kept (no GradCache),
    then a Python loop over the positive slots, each slot's queries scored against that slot's positives and all the
    negatives, the slot losses averaged. The memory and time baseline of the cached IR loss.

    Args:
        model: A SentenceTransformer.
        num_positives: Positive columns after the anchor column (the rest are negatives).
        scale: Inverse temperature of the scores.

    Returns:
        ``loss_fn(sentence_features, labels)`` like a sentence-transformers loss's forward (labels are ignored).
    """
    import torch
    import torch.nn.functional as F

    def loss_fn(sentence_features: list[dict], labels: Any = None) -> torch.Tensor:
        embeddings = [F.normalize(model(dict(f))["sentence_embedding"], dim=-1) for f in sentence_features]
        queries, negatives = embeddings[0], embeddings[1 + num_positives :]
        target = torch.arange(len(queries), device=queries.device)
        slot_losses = []
        for k in range(num_positives):
            scores = queries @ torch.cat([embeddings[1 + k], *negatives]).T * scale
            slot_losses.append(F.cross_entropy(scores, target))
        return torch.stack(slot_losses).mean()

    return loss_fn
