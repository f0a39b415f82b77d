"""Spherical merge methods: :class:`SLERP` (two checkpoints) and :class:`MultiSLERP` (the weighted spherical
Karcher mean of K), of the deltas or of the weights, per tensor; the classes and their math (SLERP and the Karcher
mean as coefficients on the stacked rows, computed from the tensor's Gram matrix)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from codiemb_st.merging.base import MergeMethod, check_weights
from codiemb_st.validation import check_choice, check_finite_float

#: What a spherical merge interpolates: the deltas θ_c − θ_0 or the weights θ_c.
Space = Literal["deltas", "weights"]
SPACES: tuple[str, ...] = ("deltas", "weights")

#: Angles (radians) below which two vectors count as parallel (and above ``π -`` which as opposed): the spherical
#: merges fall back to linear interpolation there. Near 0 the two differ by a relative O(Ω²) < 1e-8, below float32
#: resolution; near π the geodesic is not unique.
PARALLEL_ANGLE = 1e-4
#: Convergence threshold of the Karcher mean's fixed-point iteration: the norm of the mean tangent vector (radians).
KARCHER_TOLERANCE = 1e-10
#: At most this many Karcher iterations; without convergence the tensor falls back to linear interpolation.
KARCHER_MAX_ITERATIONS = 200


def spherical_gram(statistics: Tensor | None, checkpoints: Tensor, base: Tensor | None) -> Tensor:
    """The Gram matrix G_ij = Σ v_i · v_j over the rows seen so far, float64 ``(K, K)``, of the vectors a spherical
    merge interpolates: the deltas v_c = θ_c − θ_0 when ``base`` is given, else the weights v_c = θ_c."""
    vectors = (checkpoints if base is None else checkpoints - base).flatten(start_dim=1).double()
    gram = vectors @ vectors.T
    return gram if statistics is None else statistics.add_(gram)


def slerp_coefficients(gram: Tensor, t: float) -> Tensor:
    """SLERP of two vectors as a linear combination: γ (float64, shape ``(2,)``) with result = γ_0 v_0 + γ_1 v_1.

    With norms n_c = ‖v_c‖, the angle Ω = arccos(⟨v_0, v_1⟩ / (n_0 n_1)) and the unit vectors u_c = v_c / n_c::

        result = ((1 − t) n_0 + t n_1) · (sin((1 − t) Ω) u_0 + sin(t Ω) u_1) / sin Ω

    the point at fraction t along the great circle from u_0 to u_1, with the norm interpolated linearly. Fallback to
    linear interpolation, γ = (1 − t, t): when a norm is 0, or Ω < :data:`PARALLEL_ANGLE` (parallel), or
    Ω > π − :data:`PARALLEL_ANGLE` (opposed: no unique great circle).
    """
    linear = torch.tensor([1.0 - t, t], dtype=torch.float64)
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms == 0).any()):
        return linear
    omega = float(torch.arccos((gram[0, 1] / (norms[0] * norms[1])).clamp(-1.0, 1.0)))
    if omega < PARALLEL_ANGLE or omega > math.pi - PARALLEL_ANGLE:
        return linear
    norm = (1.0 - t) * float(norms[0]) + t * float(norms[1])
    sines = torch.tensor([math.sin((1.0 - t) * omega), math.sin(t * omega)], dtype=torch.float64)
    return norm * sines / (math.sin(omega) * norms)


def karcher_coefficients(gram: Tensor, weights: Tensor) -> Tensor:
    """Multi-SLERP of K vectors as a linear combination: γ (float64, shape ``(K,)``) with result = Σ_c γ_c v_c.

    The direction is the weighted Karcher (Fréchet) mean on the unit sphere of the unit vectors u_c = v_c / ‖v_c‖,
    the point m minimising Σ_c w_c · angle(m, u_c)², found by the fixed-point iteration::

        m ← exp_m(Σ_c w_c log_m(u_c)),  log_m(u) = θ / sin θ · (u − cos θ · m),  θ = arccos⟨m, u⟩,
        exp_m(x) = cos‖x‖ · m + sin‖x‖ · x / ‖x‖,

    from m = the normalised weighted mean of the u_c, until ‖Σ_c w_c log_m(u_c)‖ < :data:`KARCHER_TOLERANCE`. The
    norm is the weighted mean norm Σ_c w_c ‖v_c‖. Every iterate is a combination of the u_c, so the iteration runs on
    K coefficients through the Gram matrix alone (which is what lets a streamed merge do it per tensor). With K = 2
    this is :func:`slerp_coefficients` at t = w_1.

    Fallback to linear interpolation, γ = w, when: a vector of positive weight has norm 0; all of them are within
    :data:`PARALLEL_ANGLE` of each other; one is within it of the opposite of the mean (no unique mean); the weighted
    mean of the unit vectors is 0; or the iteration has not converged after :data:`KARCHER_MAX_ITERATIONS` steps.

    Args:
        gram: The Gram matrix of the vectors, float64 ``(K, K)`` (:func:`spherical_gram`).
        weights: Non-negative weights summing to 1, shape ``(K,)``.
    """
    weights = weights.to(torch.float64)
    linear = weights.clone()
    active = torch.nonzero(weights > 0).flatten()
    w = weights[active]
    g = gram[active][:, active]
    norms = g.diagonal().clamp_min(0).sqrt()
    if bool((norms == 0).any()):
        return linear
    cosines = (g / (norms[:, None] * norms[None, :])).clamp(-1.0, 1.0)
    cosines.fill_diagonal_(1.0)
    if float(torch.arccos(cosines).max()) < PARALLEL_ANGLE:
        return linear
    alpha = w.clone()  # m = Σ_j alpha_j u_j
    squared = float(alpha @ cosines @ alpha)
    if squared <= 1e-12:
        return linear
    alpha /= math.sqrt(squared)
    for _ in range(KARCHER_MAX_ITERATIONS):
        cos_to_mean = (cosines @ alpha).clamp(-1.0, 1.0)
        theta = torch.arccos(cos_to_mean)
        if float(theta.max()) > math.pi - PARALLEL_ANGLE:
            return linear
        scale = torch.where(theta > 1e-12, theta / torch.sin(theta), torch.ones_like(theta))
        # Σ_j w_j θ_j / sin θ_j · (u_j − cos θ_j m) in the coefficients of the u_j.
        tangent = w * scale - (w * scale * cos_to_mean).sum() * alpha
        length = math.sqrt(max(float(tangent @ cosines @ tangent), 0.0))
        if length < KARCHER_TOLERANCE:
            break
        alpha = math.cos(length) * alpha + (math.sin(length) / length) * tangent
        alpha /= math.sqrt(float(alpha @ cosines @ alpha))
    else:
        return linear
    coefficients = torch.zeros_like(weights)
    coefficients[active] = float((w * norms).sum()) * alpha / norms
    return coefficients


def combine_rows(checkpoints: Tensor, base: Tensor | None, coefficients: Tensor) -> Tensor:
    """θ = θ_0 + Σ_c γ_c (θ_c − θ_0) with a base, else Σ_c γ_c θ_c; overwrites ``checkpoints``."""
    vectors = checkpoints if base is None else checkpoints.sub_(base)
    merged = torch.tensordot(coefficients.to(vectors.dtype), vectors, dims=1)
    return merged if base is None else merged.add_(base)


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
            statistics = self.statistics_of(checkpoints, base)
        return combine_rows(checkpoints, base if self.requires_base else None, self.coefficients(statistics))


class SLERP(_SphericalMerge, name="slerp"):
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
    :data:`PARALLEL_ANGLE`.

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

    def checkpoint_weights(self, num_checkpoints: int) -> list[float] | None:
        """(1 − t, t): the fractions of the interpolation (along the great circle, so not linear coefficients)."""
        return [1.0 - self.t, self.t]

    def get_config_dict(self) -> dict[str, Any]:
        return {"t": self.t, "space": self.space}


class MultiSLERP(_SphericalMerge, name="multi_slerp"):
    """Multi-SLERP: the weighted spherical mean (Karcher mean) of K checkpoints, per tensor.

    Per tensor, with v_c the flattened deltas δ_c = θ_c − θ_0 (``space="deltas"``, the default) or the weights θ_c,
    n_c = ‖v_c‖, u_c = v_c / n_c and weights w_c (Σ_c w_c = 1)::

        m = argmin_{‖m‖ = 1} Σ_c w_c · arccos(⟨m, u_c⟩)²      (the weighted Karcher mean on the sphere)
        v = (Σ_c w_c n_c) · m
        θ = θ_0 + v   (deltas)   or   θ = v   (weights)

    m is found by the fixed-point iteration m ← exp_m(Σ_c w_c log_m(u_c)), started at the normalised weighted mean
    of the u_c, until the step is below 1e-10 rad (see :func:`karcher_coefficients`).
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

    def checkpoint_weights(self, num_checkpoints: int) -> list[float] | None:
        """The weights of the spherical mean, normalised (uniform without ``weights``)."""
        if self.weights is None:
            return [1.0 / num_checkpoints] * num_checkpoints
        return [weight / sum(self.weights) for weight in self.weights]

    def get_config_dict(self) -> dict[str, Any]:
        return {"weights": self.weights, "space": self.space}


__all__ = [
    "KARCHER_MAX_ITERATIONS",
    "KARCHER_TOLERANCE",
    "PARALLEL_ANGLE",
    "SLERP",
    "SPACES",
    "MultiSLERP",
    "Space",
    "combine_rows",
    "karcher_coefficients",
    "slerp_coefficients",
    "spherical_gram",
]
