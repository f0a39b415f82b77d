"""The per-tensor merge math, free of any I/O: pure functions of the checkpoints' tensors and the base tensor.

Every function takes the checkpoints stacked along a new dim 0, shape ``(K, rows, ...)``, in the compute dtype
(:func:`compute_dtype`), and the base rows ``(rows, ...)``; the same math runs on whole tensors
(:meth:`~codiemb_st.merging.MergeMethod.merge_tensors`) and on row slices streamed from disk
(:mod:`codiemb_st.merging.streaming_merge`). :class:`RowMerger` is the interface the streaming code needs from a
method; :mod:`codiemb_st.merging.methods` implements it on top of these functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import torch
from torch import Tensor

Granularity = Literal["element", "row", "tensor"]
GRANULARITIES: tuple[str, ...] = ("element", "row", "tensor")


class RowMerger(Protocol):
    """What a merge method offers the merge code: per-slice math and its properties."""

    #: Whether the method needs the base (pre-trained) model θ_0.
    requires_base: bool
    #: Whether merging identical checkpoints returns them (then identical inputs are copied bit for bit).
    keeps_agreement: bool

    @property
    def needs_tensor_statistics(self) -> bool:
        """Whether the weights of a row depend on the whole tensor (then tensors are read twice when streamed)."""
        ...

    def accumulate_statistics(self, statistics: Tensor | None, checkpoints: Tensor, base: Tensor | None) -> Tensor:
        """Fold one slice of rows into the per-tensor statistics."""
        ...

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Tensor | None = None) -> Tensor:
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


def merge_whole_tensor(method: RowMerger, tensors: Sequence[Tensor], base: Tensor | None) -> Tensor:
    """Merge one tensor of K checkpoints with ``method``'s row math (the whole tensor as one slice).

    The math runs in the compute dtype and the result is cast back to ``tensors[0]``'s dtype. When the method keeps
    agreement and all K tensors are equal, a copy of ``tensors[0]`` is returned, bit for bit.
    """
    tensors = check_tensors(tensors, base, method.requires_base, type(method).__name__)
    shape = tensors[0].shape
    if method.keeps_agreement and all(t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]) for t in tensors[1:]):
        return tensors[0].clone()
    dtype = compute_dtype(tensors[0].dtype)
    # Row slices need a leading dim: a 0-d tensor is merged as one row of one element.
    stacked = torch.stack([tensor.to(dtype).reshape(shape or (1,)) for tensor in tensors])
    base_rows = None if base is None or not method.requires_base else base.to(dtype).reshape(shape or (1,))
    statistics = method.accumulate_statistics(None, stacked, base_rows) if method.needs_tensor_statistics else None
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


def delta_soup_rows(
    checkpoints: Tensor,
    base: Tensor,
    power: float,
    granularity: Granularity,
    temperature: float | None,
    statistics: Tensor | None = None,
) -> Tensor:
    """θ = θ_0 + Σ_c w_c ⊙ δ_c with DeltaSoup's weights; overwrites ``checkpoints``."""
    deltas = checkpoints.sub_(base)  # the caller's scratch buffer becomes the deltas
    if temperature is not None or power == 0 or granularity == "tensor":
        weights = delta_weights(deltas, power, granularity, temperature, statistics)
        return deltas.mul_(weights).sum(dim=0).add_(base)
    # Σ_c w_c δ_c with w_c = s_c / Σ s computed as Σ_c s_c δ_c / Σ s, without materialising the weights.
    # Where Σ s = 0 every δ is 0, so the numerator is 0 and the result is the base.
    scores = delta_local_scores(deltas, power, granularity)
    total = scores.sum(dim=0)
    numerator = (scores.mul_(deltas) if scores.shape == deltas.shape else scores * deltas).sum(dim=0)
    return numerator.div_(total.clamp_min_(torch.finfo(total.dtype).tiny)).add_(base)


__all__ = [
    "GRANULARITIES",
    "Granularity",
    "RowMerger",
    "check_tensors",
    "compute_dtype",
    "delta_local_scores",
    "delta_log_statistics",
    "delta_soup_rows",
    "delta_weights",
    "merge_whole_tensor",
    "model_soup_rows",
    "task_arithmetic_rows",
    "uniform_where_zero",
]
