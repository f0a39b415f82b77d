"""The linear soups: :class:`ModelSoup` (the uniform average), :class:`TaskArithmetic` (the base plus the scaled sum
of the task vectors) and :class:`WeightedAverage` (fixed weights, which CocktailSoup fits)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from codiemb_st.merging.base import MergeMethod, check_weights
from codiemb_st.validation import check_finite_float


class ModelSoup(MergeMethod, name="model_soup"):
    """Uniform Model Soup (Wortsman et al., 2022): the element-wise mean of the checkpoints, θ = (1/K) Σ_c θ_c.

    The base model is not used; when given to :meth:`merge`, it is only checked for compatibility.

    References:
        - Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
          increasing inference time", ICML 2022. https://arxiv.org/abs/2203.05482

    Example:
        ::

            from codiemb_st.merging import ModelSoup

            merged = ModelSoup().merge(["runs/ir", "runs/sts", "runs/joint"], output_path="merged-soup")
    """

    requires_base = False
    keeps_agreement = True
    # One LoRA adapter checkpoint "averaged" alone is that adapter materialised as a full model: allowed, with a warning.
    materialises_one_adapter = True

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        return checkpoints.mean(dim=0)  # θ = (1/K) Σ_c θ_c

    def checkpoint_weights(self, num_checkpoints: int) -> list[float] | None:
        return [1.0 / num_checkpoints] * num_checkpoints


class TaskArithmetic(MergeMethod, name="task_arithmetic"):
    """Task arithmetic (Ilharco et al., 2023): θ = θ_0 + λ Σ_c (θ_c − θ_0), the base plus the scaled sum of deltas.

    With ``scale = 1/K`` this equals the uniform Model Soup.

    Args:
        scale: λ, the factor applied to the sum of the task vectors. Defaults to 1.0 (the plain sum, as in the paper
            and in mergekit's ``task_arithmetic``); values around 0.3-0.5 are common in practice. With one checkpoint
            and λ ∉ {0, 1}, the merge is θ_0 + λ · δ (e.g. half a fine-tune); at λ = 1 (or 0) one checkpoint would
            come out as a copy of itself (or of the base), which is refused.

    References:
        - Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089

    Example:
        ::

            from codiemb_st.merging import TaskArithmetic

            merged = TaskArithmetic(scale=0.5).merge(["runs/ir", "runs/sts"], base_model="base-model")
    """

    requires_base = True
    keeps_agreement = False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = check_finite_float("scale", scale)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        # θ = θ_0 + λ Σ_c (θ_c − θ_0), in place in the scratch buffer.
        return checkpoints.sub_(base).sum(dim=0).mul_(self.scale).add_(base)

    def one_checkpoint_copies(self) -> str | None:
        """One checkpoint gives θ_0 + λ · δ: the checkpoint at λ = 1, the base at λ = 0, a new model otherwise."""
        return {1.0: "checkpoint", 0.0: "base"}.get(float(self.scale))

    def one_checkpoint_needs(self) -> str | None:
        return "a scale other than 0 and 1"

    def checkpoint_weights(self, num_checkpoints: int) -> list[float] | None:
        """λ each: θ = (1 − K λ) θ_0 + λ Σ_c θ_c."""
        return [float(self.scale)] * num_checkpoints

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}


class WeightedAverage(MergeMethod):
    """The weighted Model Soup θ = Σ_c w_c θ_c (= θ_0 + Σ_c w_c δ_c, as Σ_c w_c = 1) with fixed weights.

    Not registered as a command-line method: :class:`~codiemb_st.merging.cocktail.CocktailSoup` fits its weights.

    Args:
        weights: One non-negative weight per checkpoint (normalised to sum 1).

    Example:
        ::

            WeightedAverage([0.5, 0.3, 0.2]).merge(["runs/a", "runs/b", "runs/c"], output_path="merged")
    """

    requires_base = False
    keeps_agreement = True

    def __init__(self, weights: Sequence[float]) -> None:
        values = check_weights("weights", weights)
        self.weights = [w / sum(values) for w in values]

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        weights = torch.tensor(self.weights, dtype=checkpoints.dtype)
        if weights.shape[0] != checkpoints.shape[0]:
            raise ValueError(f"{len(self.weights)} weights for {checkpoints.shape[0]} checkpoints; give one each.")
        return torch.tensordot(weights, checkpoints, dims=1)

    def checkpoint_weights(self, num_checkpoints: int) -> list[float] | None:
        return list(self.weights)

    def get_config_dict(self) -> dict[str, Any]:
        return {"weights": self.weights}


__all__ = ["ModelSoup", "TaskArithmetic", "WeightedAverage"]
