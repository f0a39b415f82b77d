"""Pure helpers the merge methods share: the compute dtype, the checks of a whole-tensor merge's inputs, equality.

No I/O and no method: each method family keeps its own math in its module (:mod:`~codiemb_st.merging.soup`,
:mod:`~codiemb_st.merging.delta_soup`, ...), and the driver that runs it lives on
:class:`~codiemb_st.merging.base.MergeMethod`. Nothing here calls back into either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the merge math runs in: float32, or float64 for float64 inputs.

    Example:
        ::

            compute_dtype(torch.bfloat16)  # torch.float32
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def all_equal(tensors: Sequence[Tensor]) -> bool:
    """Whether every tensor has the dtype and the values of ``tensors[0]`` (bit for bit, so NaN never equals)."""
    return all(t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]) for t in tensors[1:])


def check_tensors(tensors: Sequence[Any], base: Any, requires_base: bool, method_name: str) -> list[Tensor]:
    """Validate the inputs of a whole-tensor merge; returns the tensors as a list.

    Raises:
        TypeError: A tensor is not a floating-point ``torch.Tensor``.
        ValueError: No tensors, shapes differ, the base is missing although needed, or a value is NaN/infinite.

    Example:
        ::

            tensors = check_tensors([a, b], base, requires_base=True, method_name="DeltaSoup")
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


__all__ = ["all_equal", "check_tensors", "compute_dtype"]
