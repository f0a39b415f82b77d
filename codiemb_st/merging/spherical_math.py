"""The per-tensor math of the spherical merges, free of any I/O: SLERP of two checkpoints and the weighted Karcher
mean on the sphere (Multi-SLERP) of K, as coefficients on the stacked rows (re-exported by
:mod:`codiemb_st.merging.tensor_math`; the methods are :mod:`codiemb_st.merging.spherical`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

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


__all__ = [
    "KARCHER_MAX_ITERATIONS",
    "KARCHER_TOLERANCE",
    "PARALLEL_ANGLE",
    "combine_rows",
    "karcher_coefficients",
    "slerp_coefficients",
    "spherical_gram",
]
