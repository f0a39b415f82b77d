"""Model Stock (Jang et al., ECCV 2024): the checkpoints' average pulled towards the base by how much their deltas
agree in direction, per tensor; the class and its math."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from codiemb_st.merging.base import MergeMethod


class ModelStock(MergeMethod, name="model_stock"):
    """Model Stock (Jang et al., ECCV 2024): interpolate between the checkpoints' average and the base, per tensor,
    by how much the checkpoints' deltas agree in direction.

    For K >= 2 checkpoints with deltas δ_c = θ_c − θ_0, per tensor:

        cos = mean over pairs i < j of  ⟨δ_i, δ_j⟩ / (‖δ_i‖ ‖δ_j‖)
        t   = K · cos / (1 + (K − 1) · cos)
        θ   = t · (1/K) Σ_c θ_c + (1 − t) · θ_0

    Deltas that agree (cos → 1) give t → 1, the plain average; nearly orthogonal deltas (the usual case for
    independent fine-tuning runs) give a small t, pulling the average towards the base, where the paper finds the
    centre of the fine-tuned weights' distribution lies.

    **cos <= 0**: the formula has a pole at cos = −1/(K − 1) and gives t < 0 (extrapolating away from the
    checkpoints) for any negative cos, which the paper's geometry does not cover. cos is therefore clipped to
    [0, 1], so t ∈ [0, 1]: a tensor whose deltas are orthogonal or opposed on average stays at θ_0 (t = 0). A pair
    with a zero delta (a tensor one checkpoint did not change) counts as cos 0. A tensor no checkpoint changed stays
    at θ_0.

    The cosines need the whole tensor, so when streaming each tensor is read twice: first the K × K Gram matrix of
    the deltas is accumulated slice by slice (float64), then the tensor is merged. Unlike the paper's two-checkpoint
    procedure (which fine-tunes exactly two models and uses their angle), K may be any number >= 2, as in mergekit's
    ``model_stock``.

    References:
        - Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
          https://arxiv.org/abs/2403.19522

    Example:
        ::

            from codiemb_st.merging import ModelStock

            merged = ModelStock().merge(["runs/seed1", "runs/seed2", "runs/seed3"], base_model="models/base")
    """

    requires_base = True
    # Slices where the checkpoints agree still move by the tensor's ratio t (< 1 unless the deltas are parallel).
    keeps_agreement = False
    min_checkpoints = 2

    @property
    def needs_tensor_statistics(self) -> bool:
        return True

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> Tensor:
        """The K × K Gram matrix Σ δ_i · δ_j of the deltas over the rows seen so far (float64)."""
        return delta_gram(statistics, checkpoints, base)

    def interpolation_ratio(self, gram: Tensor) -> float:
        """The ratio t of a tensor from the Gram matrix of its deltas (see the class docstring)."""
        return model_stock_ratio(gram)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        if statistics is None:  # the rows are the whole tensor
            statistics = self.statistics_of(checkpoints, base)
        return model_stock_rows(checkpoints, base, model_stock_ratio(statistics))


def delta_gram(statistics: Tensor | None, checkpoints: Tensor, base: Tensor) -> Tensor:
    """The Gram matrix G_ij = Σ δ_i · δ_j of the deltas over the rows seen so far, float64, shape ``(K, K)``."""
    deltas = (checkpoints - base).flatten(start_dim=1).double()
    gram = deltas @ deltas.T
    return gram if statistics is None else statistics.add_(gram)


def model_stock_ratio(gram: Tensor) -> float:
    """Model Stock's interpolation ratio t = k·cos / (1 + (k − 1)·cos) from the deltas' Gram matrix.

    cos is the mean over the k(k−1)/2 pairs i < j of cos_ij = G_ij / sqrt(G_ii G_jj); a pair with a zero delta
    counts as cos 0 (no direction). cos is clipped to [0, 1] before the formula, so t ∈ [0, 1]: when the deltas are
    orthogonal or opposed on average (cos ≤ 0) the tensor stays at the base (t = 0) rather than extrapolating away
    from the checkpoints' average (the formula's pole at cos = −1/(k − 1) makes negative cosines meaningless).
    """
    k = gram.shape[0]
    norms = gram.diagonal().clamp_min(0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cosines = torch.where(outer > 0, gram / torch.where(outer > 0, outer, 1.0), 0.0)
    upper = torch.triu_indices(k, k, offset=1)
    cos = float(cosines[upper[0], upper[1]].mean().clamp(0.0, 1.0))
    return k * cos / (1 + (k - 1) * cos)


def model_stock_rows(checkpoints: Tensor, base: Tensor, ratio: float) -> Tensor:
    """θ = t · mean_c(θ_c) + (1 − t) · θ_0 with t = ``ratio``; overwrites ``checkpoints``."""
    # As θ_0 + t · mean_c(δ_c): exact θ_0 at t = 0.
    return checkpoints.sub_(base).mean(dim=0).mul_(ratio).add_(base)


__all__ = ["ModelStock", "delta_gram", "model_stock_ratio", "model_stock_rows"]
