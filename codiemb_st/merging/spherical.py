"""Spherical merge methods: :class:`SLERP` (two checkpoints) and :class:`MultiSLERP` (the weighted spherical
Karcher mean of K), of the deltas or of the weights, per tensor."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from codiemb_st.merging.base import MergeMethod, check_weights
from codiemb_st.merging.spherical_math import combine_rows, karcher_coefficients, slerp_coefficients, spherical_gram
from codiemb_st.merging.tensor_math import SPACES, Space
from codiemb_st.validation import check_choice, check_finite_float


class _SphericalMerge(MergeMethod):
    """What SLERP and MultiSLERP share: the space (deltas or weights) and the per-tensor Gram matrix."""

    # Coefficients are per tensor and need not sum to 1: a slice where the checkpoints agree still moves.
    keeps_agreement = False
    min_checkpoints = 2

    def __init__(self, space: Space) -> None:
        check_choice("space", space, SPACES)
        self.space = space
        self.requires_base = space == "deltas"

    @property
    def needs_tensor_statistics(self) -> bool:
        return True

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> Tensor:
        """The K × K Gram matrix of the interpolated vectors (deltas or weights) over the rows seen so far."""
        self._check_count(checkpoints.shape[0])
        return spherical_gram(statistics, checkpoints, base if self.requires_base else None)

    def _check_count(self, count: int) -> None:
        """Raise ValueError when the method cannot merge ``count`` checkpoints (checked at the first tensor)."""

    def coefficients(self, gram: Tensor) -> Tensor:
        """The per-checkpoint coefficients γ of one tensor (float64, ``(K,)``) from its Gram matrix."""
        raise NotImplementedError

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        if statistics is None:  # the rows are the whole tensor
            statistics = self._statistics_of(checkpoints, base)
        return combine_rows(checkpoints, base if self.requires_base else None, self.coefficients(statistics))


class SLERP(_SphericalMerge):
    """Spherical linear interpolation of two checkpoints, per tensor: along the great circle, not the chord.

    Per tensor, with v_c the flattened deltas δ_c = θ_c − θ_0 (``space="deltas"``, the default) or the weights θ_c
    (``space="weights"``), n_c = ‖v_c‖, Ω = arccos(⟨v_0, v_1⟩ / (n_0 n_1)) and u_c = v_c / n_c::

        v = ((1 − t) n_0 + t n_1) · (sin((1 − t) Ω) u_0 + sin(t Ω) u_1) / sin Ω
        θ = θ_0 + v   (deltas)   or   θ = v   (weights)

    The direction moves at constant angular speed from u_0 (t = 0) to u_1 (t = 1); the norm is interpolated
    linearly, so, unlike the linear average, two deltas of equal norm at an angle are not shrunk. (mergekit's
    ``slerp`` applies the sine coefficients to the raw vectors instead; the two agree when n_0 = n_1.)

    **Fallback**: linear interpolation, θ = (1 − t) θ_0' + t θ_1' of the vectors, where a vector has norm 0 (a tensor
    a fine-tune did not change), where Ω < 1e-4 rad (near-parallel: the two differ by less than float32 resolution;
    fine-tuned *weights* are often this close) and where Ω > π − 1e-4 (opposed: no unique great circle); see
    :data:`~codiemb_st.merging.tensor_math.PARALLEL_ANGLE`.

    Each tensor is read twice when streaming: once for the 2 × 2 Gram matrix (float64), once to merge.

    Args:
        t: The interpolation fraction, in [0, 1]: 0 gives checkpoints[0], 1 checkpoints[1]. Defaults to 0.5.
        space: ``"deltas"`` (interpolate the task vectors; needs ``base_model``) or ``"weights"`` (interpolate the
            weights themselves, as Qwen3-Embedding's checkpoint slerp). Defaults to ``"deltas"``.

    References:
        - Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985 (slerp).
        - Goddard et al., "Arcee's MergeKit", 2024 (``slerp``). https://arxiv.org/abs/2403.13257

    Example:
        ::

            from codiemb_st.merging import SLERP

            merged = SLERP(t=0.3).merge(["runs/ir", "runs/sts"], base_model="models/base", output_path="slerp")
    """

    def __init__(self, t: float = 0.5, space: Space = "deltas") -> None:
        super().__init__(space)
        self.t = float(check_finite_float("t", t, minimum=0.0, maximum=1.0))

    def _check_count(self, count: int) -> None:
        if count != 2:
            raise ValueError(f"SLERP merges exactly 2 checkpoints, got {count}; use MultiSLERP for more.")

    def coefficients(self, gram: Tensor) -> Tensor:
        return slerp_coefficients(gram, self.t)

    def get_config_dict(self) -> dict[str, Any]:
        return {"t": self.t, "space": self.space}


class MultiSLERP(_SphericalMerge):
    """Multi-SLERP: the weighted spherical mean (Karcher mean) of K checkpoints, per tensor.

    Per tensor, with v_c the flattened deltas δ_c = θ_c − θ_0 (``space="deltas"``, the default) or the weights θ_c,
    n_c = ‖v_c‖, u_c = v_c / n_c and weights w_c (Σ_c w_c = 1)::

        m = argmin_{‖m‖ = 1} Σ_c w_c · arccos(⟨m, u_c⟩)²      (the weighted Karcher mean on the sphere)
        v = (Σ_c w_c n_c) · m
        θ = θ_0 + v   (deltas)   or   θ = v   (weights)

    m is found by the fixed-point iteration m ← exp_m(Σ_c w_c log_m(u_c)), started at the normalised weighted mean
    of the u_c, until the step is below 1e-10 rad (see :func:`~codiemb_st.merging.tensor_math.karcher_coefficients`).
    With K = 2 and weights (1 − t, t) this is :class:`SLERP` at t. (mergekit's ``multislerp`` takes one such step
    from the normalised mean; this iterates to the mean itself.)

    **Fallback**: the weighted linear average Σ_c w_c v_c where a vector of positive weight has norm 0, where all of
    them lie within 1e-4 rad of each other (near-parallel), where the mean of the unit vectors is 0 or a vector is
    opposed to the mean (no unique spherical mean), or where the iteration has not converged after 200 steps.

    Each tensor is read twice when streaming: once for the K × K Gram matrix (float64), once to merge.

    Args:
        weights: One non-negative weight per checkpoint (normalised to sum 1), or None for uniform weights.
        space: ``"deltas"`` (needs ``base_model``; BOOM's use of mergekit's multislerp) or ``"weights"``. Defaults
            to ``"deltas"``.

    References:
        - Buss and Fillmore, "Spherical averages and applications to spherical splines and interpolation", ACM
          Transactions on Graphics 2001.
        - Goddard et al., "Arcee's MergeKit", 2024 (``multislerp``). https://arxiv.org/abs/2403.13257

    Example:
        ::

            from codiemb_st.merging import MultiSLERP

            merged = MultiSLERP().merge(["runs/s1", "runs/s2", "runs/s3"], base_model="models/base")
    """

    def __init__(self, weights: Sequence[float] | None = None, space: Space = "deltas") -> None:
        super().__init__(space)
        self.weights = None if weights is None else check_weights("weights", weights)

    def _check_count(self, count: int) -> None:
        if self.weights is not None and len(self.weights) != count:
            raise ValueError(f"MultiSLERP has {len(self.weights)} weights for {count} checkpoints; give one each.")

    def coefficients(self, gram: Tensor) -> Tensor:
        k = gram.shape[0]
        weights = torch.full((k,), 1.0 / k, dtype=torch.float64) if self.weights is None else None
        if weights is None:
            weights = torch.tensor(self.weights, dtype=torch.float64)
            weights = weights / weights.sum()
        return karcher_coefficients(gram, weights)

    def get_config_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "space": self.space}


__all__ = ["SLERP", "MultiSLERP"]
