"""The per-tensor merge math, free of any I/O: pure functions of the checkpoints' tensors and the base tensor.

Every function takes the checkpoints stacked along a new dim 0, shape ``(K, rows, ...)``, in the compute dtype
(:func:`compute_dtype`), and the base rows ``(rows, ...)``; the same math runs on whole tensors
(:meth:`~codiemb_st.merging.MergeMethod.merge_tensors`) and on row slices streamed from disk
(:mod:`codiemb_st.merging.streaming_merge`). :class:`RowMerger` is the interface the streaming code needs from a
method; :mod:`codiemb_st.merging.methods` implements it on top of these functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

Granularity = Literal["element", "row", "tensor"]
GRANULARITIES: tuple[str, ...] = ("element", "row", "tensor")
#: What a spherical merge interpolates: the deltas θ_c − θ_0 or the weights θ_c.
Space = Literal["deltas", "weights"]
SPACES: tuple[str, ...] = ("deltas", "weights")


class RowMerger(Protocol):
    """What a merge method offers the merge code: per-slice math and its properties."""

    #: Whether the method needs the base (pre-trained) model θ_0.
    requires_base: bool
    #: Whether merging identical checkpoints returns them (then identical inputs are copied bit for bit).
    keeps_agreement: bool
    #: The fewest checkpoints the method can merge.
    min_checkpoints: int

    @property
    def needs_tensor_statistics(self) -> bool:
        """Whether the weights of a row depend on the whole tensor (then tensors are read twice when streamed)."""
        ...

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> Any:
        """Fold one slice of rows into the per-tensor statistics (must not modify ``checkpoints``)."""
        ...

    def finish_statistics_pass(self, statistics: Any) -> tuple[Any, bool]:
        """Close one pass over all slices of a tensor; returns the statistics and whether to pass over it again."""
        ...

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        """Merge one slice of rows (``checkpoints`` is a scratch buffer the method may overwrite)."""
        ...

    def get_config_dict(self) -> dict[str, Any]:
        """The method's parameters."""
        ...


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the merge math runs in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def uniform_where_zero(scores: Tensor) -> Tensor:
    """Normalise non-negative scores over dim 0; where all K scores are 0, return 1/K (uniform)."""
    total = scores.sum(dim=0, keepdim=True)
    uniform = torch.full_like(total, 1.0 / scores.shape[0])
    return torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), uniform)


def check_tensors(tensors: Sequence[Any], base: Any, requires_base: bool, method_name: str) -> list[Tensor]:
    """Validate the inputs of a whole-tensor merge; returns the tensors as a list.

    Raises:
        TypeError: A tensor is not a floating-point ``torch.Tensor``.
        ValueError: No tensors, shapes differ, the base is missing although needed, or a value is NaN/infinite.
    """
    if isinstance(tensors, Tensor):
        raise TypeError("tensors must be a sequence of K tensors (one per checkpoint), not a single tensor.")
    tensors = list(tensors)
    if not tensors:
        raise ValueError("tensors must hold at least one checkpoint tensor.")
    shape = tensors[0].shape if isinstance(tensors[0], Tensor) else None
    for index, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"tensors[{index}] must be a torch.Tensor, got {type(tensor).__name__}.")
        if tensor.shape != shape:
            raise ValueError(f"tensors[{index}] has shape {tuple(tensor.shape)}, tensors[0] has {tuple(shape)}.")
        if not tensor.is_floating_point():
            raise TypeError(f"tensors[{index}] has dtype {tensor.dtype}; only floating-point tensors are merged.")
        if not torch.isfinite(tensor).all():
            raise ValueError(f"tensors[{index}] holds NaN or infinite values; refusing to merge it.")
    if requires_base and base is None:
        raise ValueError(f"{method_name} needs base, the pre-trained tensor θ_0 the deltas are taken from.")
    if base is not None:
        if not isinstance(base, Tensor) or not base.is_floating_point():
            raise TypeError(f"base must be a floating-point torch.Tensor, got {type(base).__name__}.")
        if base.shape != shape:
            raise ValueError(f"base has shape {tuple(base.shape)}, the checkpoint tensors have {tuple(shape)}.")
        if not torch.isfinite(base).all():
            raise ValueError("base holds NaN or infinite values; refusing to merge with it.")
    return tensors


def check_num_checkpoints(method: RowMerger, count: int) -> None:
    """Raise ValueError when ``method`` cannot merge ``count`` checkpoints."""
    needed = getattr(method, "min_checkpoints", 1)
    if count < needed:
        raise ValueError(f"{type(method).__name__} needs at least {needed} checkpoints, got {count}.")


def fold_statistics(method: RowMerger, slices: Callable[[], Iterable[tuple[Tensor, Tensor | None]]]) -> Any:
    """Run the method's statistics passes: fold every ``(checkpoints, base)`` slice of ``slices()`` into the
    statistics, once per pass, until :meth:`RowMerger.finish_statistics_pass` says the statistics are complete.

    ``slices`` is called once per pass (a streamed tensor is read again each time). Returns None when the method
    needs no statistics.
    """
    if not method.needs_tensor_statistics:
        return None
    statistics = None
    while True:
        for checkpoints, base in slices():
            statistics = method.accumulate_statistics(statistics, checkpoints, base)
        statistics, again = method.finish_statistics_pass(statistics)
        if not again:
            return statistics


def merge_whole_tensor(method: RowMerger, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
    """Merge one tensor of K checkpoints with ``method``'s row math (the whole tensor as one slice).

    The math runs in the compute dtype and the result is cast back to ``tensors[0]``'s dtype. When the method keeps
    agreement and all K tensors are equal, a copy of ``tensors[0]`` is returned, bit for bit.
    """
    tensors = check_tensors(tensors, base, method.requires_base, type(method).__name__)
    check_num_checkpoints(method, len(tensors))
    shape = tensors[0].shape
    if method.keeps_agreement and all(t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]) for t in tensors[1:]):
        return tensors[0].clone()
    dtype = compute_dtype(tensors[0].dtype)
    # Row slices need a leading dim: a 0-d tensor is merged as one row of one element.
    stacked = torch.stack([tensor.to(dtype).reshape(shape or (1,)) for tensor in tensors])
    base_rows = None if base is None or not method.requires_base else base.to(dtype).reshape(shape or (1,))
    statistics = fold_statistics(method, lambda: [(stacked, base_rows)])
    return method.merge_rows(stacked, base_rows, statistics).reshape(shape).to(tensors[0].dtype)


# ---------------------------------------------------------------------------------------------------------------------
# Model Soup and task arithmetic


def model_soup_rows(checkpoints: Tensor) -> Tensor:
    """θ = (1/K) Σ_c θ_c."""
    return checkpoints.mean(dim=0)


def task_arithmetic_rows(checkpoints: Tensor, base: Tensor, scale: float) -> Tensor:
    """θ = θ_0 + λ Σ_c (θ_c − θ_0); overwrites ``checkpoints``."""
    return checkpoints.sub_(base).sum(dim=0).mul_(scale).add_(base)


# ---------------------------------------------------------------------------------------------------------------------
# DeltaSoup


def delta_log_statistics(statistics: Tensor | None, checkpoints: Tensor, base: Tensor, power: float) -> Tensor:
    """log Σ |δ_c|^p over the rows seen so far (folding in this slice), one float64 value per checkpoint."""
    magnitudes = (checkpoints - base).abs().flatten(start_dim=1).double()
    largest = magnitudes.max()
    if largest == 0:
        log_scores = torch.full((checkpoints.shape[0],), -math.inf, dtype=torch.float64)
    else:
        # log Σ|δ|^p = p log m + log Σ(|δ|/m)^p, with m the largest |δ|: no underflow for large p.
        log_scores = power * largest.log() + (magnitudes / largest).pow(power).sum(dim=1).log()
    return log_scores if statistics is None else torch.logaddexp(statistics, log_scores)


def delta_local_scores(deltas: Tensor, power: float, granularity: Granularity) -> Tensor:
    """Element- or row-wise scores proportional to |δ|^p (a fresh tensor), scaled by the largest |δ| of the group so
    that large powers do not underflow."""
    magnitudes = deltas.abs()
    # Row sums reduce over every dim after the row dim; 0-d/1-d tensors (dims (K,) or (K, n)) have none.
    row_dims = tuple(range(2, deltas.dim())) if granularity == "row" else ()
    if power != 1 or row_dims:
        largest = magnitudes.amax(dim=(0, *row_dims), keepdim=True)
        magnitudes = magnitudes.div_(torch.where(largest > 0, largest, 1.0))
        if power != 1:
            magnitudes = magnitudes.pow_(power)
    return magnitudes.sum(dim=row_dims, keepdim=True) if row_dims else magnitudes


def delta_weights(
    deltas: Tensor,
    power: float,
    granularity: Granularity,
    temperature: float | None,
    statistics: Tensor | None = None,
) -> Tensor:
    """DeltaSoup's merging weights w_c for deltas stacked along dim 0 (see :class:`~codiemb_st.merging.DeltaSoup`).

    Returns:
        Non-negative weights summing to 1 over dim 0, broadcastable to ``deltas``.
    """
    k = deltas.shape[0]
    if power == 0:
        scores = torch.ones((k,) + (1,) * (deltas.dim() - 1), dtype=deltas.dtype, device=deltas.device)
    elif granularity == "tensor":
        if statistics is None:
            statistics = delta_log_statistics(None, deltas, torch.zeros_like(deltas[0]), power)
        log_scores = statistics.to(torch.float64)
        if torch.isinf(log_scores).all():  # every delta is 0
            log_scores = torch.zeros_like(log_scores)
        scores = torch.softmax(log_scores, dim=0).to(deltas.dtype).reshape((k,) + (1,) * (deltas.dim() - 1))
    else:
        scores = delta_local_scores(deltas, power, granularity)
    weights = uniform_where_zero(scores)
    if temperature is not None:
        weights = torch.softmax(weights / temperature, dim=0)
    return weights


def sign_consensus_(deltas: Tensor) -> Tensor:
    """Zero, in place, every δ_c whose sign differs from the elected sign sign(Σ_c δ_c) (TIES-style election).

    Where Σ_c δ_c = 0 the elected sign is 0 and every delta of that parameter is zeroed. Returns ``deltas``.
    """
    elected = deltas.sum(dim=0).sign_()
    return deltas.mul_(deltas.sign() == elected)


def delta_soup_delta(
    deltas: Tensor,
    power: float,
    granularity: Granularity,
    temperature: float | None,
    statistics: Tensor | None = None,
) -> Tensor:
    """The merged delta Σ_c w_c ⊙ δ_c with DeltaSoup's weights (:func:`delta_weights`); overwrites ``deltas``."""
    if temperature is not None or power == 0 or granularity == "tensor":
        weights = delta_weights(deltas, power, granularity, temperature, statistics)
        return deltas.mul_(weights).sum(dim=0)
    # Σ_c w_c δ_c with w_c = s_c / Σ s computed as Σ_c s_c δ_c / Σ s, without materialising the weights.
    # Where Σ s = 0 every δ is 0, so the numerator is 0 and the result is 0.
    scores = delta_local_scores(deltas, power, granularity)
    total = scores.sum(dim=0)
    numerator = (scores.mul_(deltas) if scores.shape == deltas.shape else scores * deltas).sum(dim=0)
    return numerator.div_(total.clamp_min_(torch.finfo(total.dtype).tiny))


def delta_soup_rows(
    checkpoints: Tensor,
    base: Tensor,
    power: float,
    granularity: Granularity,
    temperature: float | None,
    statistics: Tensor | None = None,
    *,
    sign_consensus: bool = False,
    rescale_factor: float | None = None,
) -> Tensor:
    """θ = θ_0 + f · Σ_c w_c ⊙ (m_c ⊙ δ_c) with DeltaSoup's weights; overwrites ``checkpoints``.

    ``m_c`` is the sign-consensus mask (:func:`sign_consensus_`) when ``sign_consensus``, else 1; ``f`` is
    ``rescale_factor`` (:func:`rescale_factor`), else 1. With tensor granularity, ``statistics`` are the log-scores
    of the (masked) deltas of the whole tensor (:func:`delta_log_scores`).
    """
    deltas = checkpoints.sub_(base)  # the caller's scratch buffer becomes the deltas
    if sign_consensus:
        sign_consensus_(deltas)
    merged = delta_soup_delta(deltas, power, granularity, temperature, statistics)
    if rescale_factor is not None:
        merged.mul_(rescale_factor)
    return merged.add_(base)


def delta_log_scores(statistics: Tensor | None, deltas: Tensor, power: float) -> Tensor:
    """log Σ |δ_c|^p of deltas (not checkpoints) folded into ``statistics``; see :func:`delta_log_statistics`."""
    return delta_log_statistics(statistics, deltas, torch.zeros((), dtype=deltas.dtype), power)


@dataclass
class NormStatistics:
    """Per-tensor sums of squares for DeltaSoup's norm rescaling (float64).

    Attributes:
        log_scores: Tensor-granularity log-scores from a first pass (None when not needed).
        weights_done: Whether the log-score pass is finished (the norm pass runs after it).
        delta_squares: Σ δ_c² per checkpoint, shape ``(K,)``.
        merged_squares: Σ (Σ_c w_c δ_c)², a 0-d tensor.
        factor: The rescale factor, set when the norm pass is finished.
    """

    log_scores: Tensor | None = None
    weights_done: bool = False
    delta_squares: Tensor | None = None
    merged_squares: Tensor | None = None
    factor: float | None = None


def rescale_factor(delta_squares: Tensor, merged_squares: Tensor) -> float:
    """f = mean_c ‖δ_c‖ / ‖Σ_c w_c δ_c‖: restores the merged delta to the checkpoints' mean norm (1 if it is 0)."""
    merged_norm = float(merged_squares.sqrt())
    if merged_norm == 0:
        return 1.0
    return float(delta_squares.sqrt().mean()) / merged_norm


# ---------------------------------------------------------------------------------------------------------------------
# Model Stock


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


# ---------------------------------------------------------------------------------------------------------------------
# TIES: exact per-tensor top-k magnitude thresholds while streaming (radix select over the float bit patterns)

#: Bits per radix digit: a 65,536-bin histogram per checkpoint per pass (0.5 MiB each in int64).
RADIX_BITS = 16


@dataclass
class RadixSelectState:
    """The state of an exact k-th-largest selection of |δ_c| per checkpoint, one radix digit per pass.

    Non-negative IEEE floats order like their bit patterns read as integers, so the k-th largest |δ| is found digit
    by digit from the top: each pass histograms the next 16 bits of the values whose higher bits equal the prefix
    found so far, and picks the digit where the count from the top reaches k. float32 needs 2 passes, float64 4.

    Attributes:
        density: The kept fraction (k = ceil(density · numel)).
        bits: 32 or 64 (the compute dtype's width).
        shift: The low bit of the digit of the current pass.
        prefix: The bits decided so far, per checkpoint, int64 ``(K,)``.
        remaining: The rank still sought among values with that prefix (1 = the largest), int64 ``(K,)``.
        histogram: The current pass's histogram, int64 ``(K, 2**RADIX_BITS)``.
        thresholds: The k-th largest |δ_c| per checkpoint once done, in the compute dtype.
    """

    density: float
    bits: int
    shift: int
    prefix: Tensor | None = None
    remaining: Tensor | None = None
    histogram: Tensor | None = None
    thresholds: Tensor | None = None


def _magnitude_bits(deltas: Tensor) -> Tensor:
    """|δ| as integers that order like the magnitudes, shape ``(K, n)``."""
    flat = deltas.abs().flatten(start_dim=1)
    return flat.view(torch.int64 if flat.dtype == torch.float64 else torch.int32)


def topk_threshold_accumulate(
    state: RadixSelectState | None, checkpoints: Tensor, base: Tensor, density: float
) -> RadixSelectState:
    """Fold one slice into the current pass's digit histogram (see :class:`RadixSelectState`)."""
    if state is None:
        bits = 64 if checkpoints.dtype == torch.float64 else 32
        state = RadixSelectState(density=density, bits=bits, shift=bits - RADIX_BITS)
    magnitudes = _magnitude_bits(checkpoints - base).long()
    k = magnitudes.shape[0]
    if state.histogram is None:
        state.histogram = torch.zeros((k, 2**RADIX_BITS), dtype=torch.int64)
    digit_mask = 2**RADIX_BITS - 1
    for index in range(k):
        values = magnitudes[index]
        if state.prefix is not None:  # later passes: only the values that share the decided high bits
            values = values[(values >> (state.shift + RADIX_BITS)) == state.prefix[index]]
        state.histogram[index] += torch.bincount((values >> state.shift) & digit_mask, minlength=2**RADIX_BITS)
    return state


def topk_threshold_finish(state: RadixSelectState) -> tuple[RadixSelectState, bool]:
    """Pick the digit of this pass; returns the state and whether another pass is needed."""
    histogram = state.histogram
    if state.remaining is None:  # after the first pass: the histogram counts every element once
        numel = int(histogram[0].sum())
        keep = max(1, math.ceil(state.density * numel))
        state.remaining = torch.full((histogram.shape[0],), keep, dtype=torch.int64)
        state.prefix = torch.zeros(histogram.shape[0], dtype=torch.int64)
    # Counts from the largest digit down; the digit is the first where the running count reaches the rank sought.
    from_top = histogram.flip(dims=(1,)).cumsum(dim=1)
    position = (from_top < state.remaining[:, None]).sum(dim=1)
    digit = 2**RADIX_BITS - 1 - position
    above = torch.where(position > 0, from_top.gather(1, (position - 1).clamp_min(0)[:, None])[:, 0], 0)
    state.remaining = state.remaining - above
    state.prefix = (state.prefix << RADIX_BITS) | digit
    state.histogram = None
    if state.shift > 0:
        state.shift -= RADIX_BITS
        return state, True
    dtype = torch.float64 if state.bits == 64 else torch.float32
    bits_dtype = torch.int64 if state.bits == 64 else torch.int32
    state.thresholds = state.prefix.to(bits_dtype).view(dtype)
    return state, False


def ties_rows(checkpoints: Tensor, base: Tensor, thresholds: Tensor | None, scale: float) -> Tensor:
    """TIES: trim, elect, disjoint mean; θ = θ_0 + λ · merged. Overwrites ``checkpoints``.

    Args:
        checkpoints: ``(K, rows, ...)``.
        base: ``(rows, ...)``.
        thresholds: Per checkpoint, the k-th largest |δ_c| of the whole tensor (:class:`RadixSelectState`); entries
            with |δ_c| below it are zeroed (ties at the threshold are kept). None keeps everything (density 1).
        scale: λ.
    """
    deltas = checkpoints.sub_(base)
    if thresholds is not None:
        shape = (deltas.shape[0],) + (1,) * (deltas.dim() - 1)
        deltas.mul_(deltas.abs() >= thresholds.to(deltas.dtype).reshape(shape))
    elected = deltas.sum(dim=0).sign_()
    # Disjoint mean: over the checkpoints whose (kept, nonzero) delta has the elected sign; 0 where there is none.
    agree = (deltas.sign() == elected) & (deltas != 0)
    count = agree.sum(dim=0)
    merged = deltas.mul_(agree).sum(dim=0).div_(count.clamp_min_(1))
    return merged.mul_(scale).add_(base)


# Spherical merges (SLERP, Multi-SLERP): their math is in spherical_math, re-exported here.
from codiemb_st.merging.spherical_math import (  # noqa: E402
    KARCHER_MAX_ITERATIONS,
    KARCHER_TOLERANCE,
    PARALLEL_ANGLE,
    combine_rows,
    karcher_coefficients,
    slerp_coefficients,
    spherical_gram,
)

__all__ = [
    "GRANULARITIES",
    "KARCHER_MAX_ITERATIONS",
    "KARCHER_TOLERANCE",
    "PARALLEL_ANGLE",
    "RADIX_BITS",
    "Granularity",
    "NormStatistics",
    "RadixSelectState",
    "SPACES",
    "RowMerger",
    "Space",
    "check_num_checkpoints",
    "check_tensors",
    "combine_rows",
    "compute_dtype",
    "delta_gram",
    "delta_local_scores",
    "delta_log_scores",
    "delta_log_statistics",
    "delta_soup_delta",
    "delta_soup_rows",
    "delta_weights",
    "fold_statistics",
    "karcher_coefficients",
    "merge_whole_tensor",
    "model_soup_rows",
    "model_stock_ratio",
    "model_stock_rows",
    "rescale_factor",
    "sign_consensus_",
    "slerp_coefficients",
    "spherical_gram",
    "task_arithmetic_rows",
    "ties_rows",
    "topk_threshold_accumulate",
    "topk_threshold_finish",
    "uniform_where_zero",
]
