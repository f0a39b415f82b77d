"""Padding efficiency: real / embedded tokens of a step's passes, counted without running the model.

Example:
    ::

        from measurement.padding import padding_efficiency

        print(padding_efficiency(model_path, "en_snli", max_seq_length=128, batch=256, mini=32))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from measurement.data import sample_columns

if TYPE_CHECKING:
    import torch


def fixed_ranges(rows: int, mini: int) -> list[tuple[int, int]]:
    """``(begin, end)`` mini-batches of ``mini`` rows in order, as sentence-transformers' GradCache splits a column
    when no token budget is set (its ``_minibatch_ranges``, private, is not imported here)."""
    return [(begin, min(begin + mini, rows)) for begin in range(0, rows, mini)]


def padding_efficiency(model_path: str, dataset: str, max_seq_length: int, batch: int, mini: int) -> dict:
    """Real / embedded tokens of a step's first pass, counted without running the model: one forward per column
    (ST MNRL, CoSENT), ST's mini-batches trimmed of trailing padding (ST CMNRL), and ours (length-sorted mini-batches,
    or, when the column fits in one, the single pass's chunks)."""
    from sentence_transformers import SentenceTransformer

    from codiemb_st.losses import length_order

    model = SentenceTransformer(model_path, device="cpu")
    model.max_seq_length = max_seq_length
    columns, _ = sample_columns(dataset, batch)
    real, embedded = 0, {"full": 0, "st_mini": 0, "ours": 0}

    def trimmed(lengths: torch.Tensor, ranges: list[tuple[int, int]]) -> int:
        return sum((end - begin) * int(lengths[begin:end].max()) for begin, end in ranges)

    for column in columns:
        feature = model.tokenize(column)
        lengths = feature["attention_mask"].sum(1)
        real += int(lengths.sum())
        embedded["full"] += feature["attention_mask"].numel()
        embedded["st_mini"] += trimmed(lengths, fixed_ranges(len(lengths), mini))
        sorted_feature, _ = length_order.sort_by_length(feature)
        sorted_lengths = sorted_feature["attention_mask"].sum(1)
        ranges = fixed_ranges(len(sorted_lengths), mini)
        if len(ranges) == 1:
            ranges = length_order.column_chunks(sorted_feature)
        embedded["ours"] += trimmed(sorted_lengths, ranges)
    return {name: real / value for name, value in embedded.items()}
