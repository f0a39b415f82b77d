"""TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge; the class and its math, with the exact
per-tensor top-k thresholds found while streaming (a radix select over the float bit patterns)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from codiemb_st.merging.base import MergeMethod
from codiemb_st.validation import check_finite_float


class TIES(MergeMethod, name="ties"):
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

    For K checkpoints with deltas δ_c = θ_c − θ_0, per tensor:

    1. **Trim**: keep each δ_c's top-``density`` fraction of entries by magnitude, zero the rest:
       δ̂_c = δ_c ⊙ 1[|δ_c| >= τ_c], with τ_c the k-th largest |δ_c| of the tensor, k = ceil(density · numel).
    2. **Elect**: s = sign(Σ_c δ̂_c) per parameter.
    3. **Disjoint mean**: m = Σ_c δ̂_c 1[sign(δ̂_c) = s, δ̂_c ≠ 0] / #{c : sign(δ̂_c) = s, δ̂_c ≠ 0} (0 where no
       checkpoint agrees).
    4. θ = θ_0 + λ · m, with λ = ``scale``.

    **Exact top-k while streaming**: τ_c is the exact k-th largest |δ_c| of the whole tensor, found without holding
    the tensor: non-negative floats order like their bit patterns, so a radix select histograms 16 bits of the
    magnitudes per pass (65,536 counters per checkpoint) and narrows to the k-th value digit by digit — two reads of
    each tensor for float32/float16/bfloat16 weights (merged in float32), four for float64, then the merge read.
    Memory stays at a few row slices whatever the tensor size; the result equals sorting each full tensor. Entries
    tied with τ_c are all kept (so slightly more than k survive when magnitudes repeat, e.g. where a tensor's deltas
    are mostly 0). With ``density=1`` nothing is trimmed and no statistics pass is made.

    Args:
        density: The fraction of each delta's entries kept, in (0, 1]. Defaults to 0.2 (the paper's top-20%).
        scale: λ, applied to the merged delta. Defaults to 1.0 (the paper tunes it in [0.8, 1.8]).

    References:
        - Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
          https://arxiv.org/abs/2306.01708

    Example:
        ::

            from codiemb_st.merging import TIES

            merged = TIES(density=0.2).merge(["runs/ir", "runs/sts", "runs/joint"], base_model="models/base")
    """

    requires_base = True
    # Identical checkpoints are trimmed to their top fraction: the result is not the checkpoint.
    keeps_agreement = False

    def __init__(self, density: float = 0.2, scale: float = 1.0) -> None:
        self.density = float(check_finite_float("density", density, minimum=0.0, maximum=1.0, strict_minimum=True))
        self.scale = float(check_finite_float("scale", scale))

    @property
    def needs_tensor_statistics(self) -> bool:
        return self.density < 1

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> RadixSelectState:
        """One slice into the current radix-select pass of the per-checkpoint top-k magnitude thresholds."""
        return topk_threshold_accumulate(statistics, checkpoints, base, self.density)

    def finish_statistics_pass(self, statistics: Any) -> tuple[Any, bool]:
        return topk_threshold_finish(statistics)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        if statistics is None and self.needs_tensor_statistics:  # the rows are the whole tensor
            statistics = self.statistics_of(checkpoints, base)
        thresholds = None if statistics is None else statistics.thresholds
        return ties_rows(checkpoints, base, thresholds, self.scale)

    def one_checkpoint_copies(self) -> str | None:
        """One checkpoint gives θ_0 + λ · trim(δ) (one sign, so the election keeps it): the base at λ = 0, the
        checkpoint at λ = 1 and ``density=1``, a new model otherwise (a trimmed or scaled task vector)."""
        if self.scale == 0:
            return "base"
        return "checkpoint" if self.scale == 1 and self.density == 1 else None

    def one_checkpoint_needs(self) -> str | None:
        return "a scale other than 0 and 1, or a density below 1"

    def get_config_dict(self) -> dict[str, Any]:
        return {"density": self.density, "scale": self.scale}


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


def magnitude_bits(deltas: Tensor) -> Tensor:
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
    magnitudes = magnitude_bits(checkpoints - base).long()
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


__all__ = [
    "RADIX_BITS",
    "TIES",
    "RadixSelectState",
    "magnitude_bits",
    "ties_rows",
    "topk_threshold_accumulate",
    "topk_threshold_finish",
]
