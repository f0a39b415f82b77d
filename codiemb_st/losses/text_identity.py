"""Identify identical input texts inside a batch by their token ids, not by their embeddings.

Two queries that share a passage make that passage a false negative for each other. Whether two inputs are the
same text must be decided on the inputs: with dropout on, the embeddings of one text differ from call to call.
The identity is a 64-bit hash of the (unpadded) token ids, computed in torch on the batch's device so that it can
be gathered across ranks like any tensor and costs no host synchronisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

# splitmix64 constants, written as signed int64 (torch has no uint64 arithmetic; int64 products wrap around).
_GOLDEN = -7046029254386353131  # 0x9E3779B97F4A7C15
_MIX_1 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_MIX_2 = -7723592293110705685  # 0x94D049BB133111EB


def _logical_shift_right(x: Tensor, bits: int) -> Tensor:
    # torch's >> is arithmetic on int64; mask the sign-extended bits to get splitmix64's logical shift.
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix(x: Tensor) -> Tensor:
    """splitmix64 finaliser: a bijective scramble of 64-bit integers (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ _logical_shift_right(x, 30)) * _MIX_1
    x = (x ^ _logical_shift_right(x, 27)) * _MIX_2
    return x ^ _logical_shift_right(x, 31)


def _hash_padded(input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Hash every row of a padded ``(batch, seq)`` token matrix; padding (left or right) does not matter."""
    mask = attention_mask.to(torch.bool)
    # Position counted among real tokens only, so left and right padding give the same hash.
    positions = torch.cumsum(mask.to(torch.int64), dim=1)
    token_codes = _mix(_mix(input_ids.to(torch.int64)) + positions)
    row_hash = torch.where(mask, token_codes, torch.zeros_like(token_codes)).sum(dim=1)
    return _mix(row_hash + mask.sum(dim=1))


def _hash_flattened(input_ids: Tensor, cu_seq_lens: Tensor) -> Tensor:
    """Hash every sequence of a flattened batch (``DataCollatorWithFlattening``: ids concatenated, offsets)."""
    input_ids = input_ids.reshape(-1).to(torch.int64)
    num_tokens = input_ids.numel()
    token_index = torch.arange(num_tokens, device=input_ids.device)
    sequence_index = torch.searchsorted(cu_seq_lens[1:].to(torch.int64), token_index, right=True)
    positions = token_index - cu_seq_lens[:-1].to(torch.int64)[sequence_index] + 1
    token_codes = _mix(_mix(input_ids) + positions)
    num_sequences = len(cu_seq_lens) - 1
    row_hash = torch.zeros(num_sequences, dtype=torch.int64, device=input_ids.device)
    row_hash.index_add_(0, sequence_index, token_codes)
    lengths = (cu_seq_lens[1:] - cu_seq_lens[:-1]).to(torch.int64)
    return _mix(row_hash + lengths)


def hash_texts(sentence_feature: dict[str, Any]) -> Tensor:
    """Return one int64 identity per input of a tokenized column; equal inputs get equal identities.

    Args:
        sentence_feature: One tokenized column as the trainer hands it to a loss (``input_ids`` with either an
            ``attention_mask`` or flattened ``cu_seq_lens_q`` offsets).

    Returns:
        A ``(batch,)`` int64 tensor on the inputs' device. Different texts collide with probability about
        ``batch**2 / 2**64``.

    Raises:
        ValueError: If the column holds no token ids (e.g. image inputs).
    """
    input_ids = sentence_feature.get("input_ids")
    if not isinstance(input_ids, Tensor):
        raise ValueError(
            "Duplicate masking compares inputs by their token ids, but this column has no 'input_ids' "
            f"(keys: {sorted(sentence_feature)}). Pass mask_duplicates=False to the loss for such inputs."
        )
    if "cu_seq_lens_q" in sentence_feature:
        return _hash_flattened(input_ids, sentence_feature["cu_seq_lens_q"])
    attention_mask = sentence_feature.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    return _hash_padded(input_ids, attention_mask)


def hash_columns(sentence_features: Sequence[dict[str, Any]]) -> Tensor:
    """Stack :func:`hash_texts` of every column into a ``(batch, num_columns)`` int64 tensor."""
    return torch.stack([hash_texts(feature) for feature in sentence_features], dim=1)
