from __future__ import annotations

import pytest
import torch

from measurement.data import column_features, sts_labels, synthetic_mining_records, word_texts
from measurement.timing import MethodClock


def test_word_texts_are_seeded_and_distinct():
    texts = word_texts(5, 4, seed=3)
    assert texts == word_texts(5, 4, seed=3)
    assert len(set(texts)) == 5
    assert all(len(text.split()) == 5 for text in texts)  # 4 words and the row number


def test_sts_label_kinds():
    generator = torch.Generator().manual_seed(0)
    binary = sts_labels("binary", 50, generator)
    assert set(binary.tolist()) <= {0.0, 1.0}
    continuous = sts_labels("continuous", 50, generator)
    assert 0 <= float(continuous.min()) and float(continuous.max()) <= 5
    with pytest.raises(ValueError, match="unknown label kind 'ranks'"):
        sts_labels("ranks", 4, generator)


def test_synthetic_mining_records_fill_the_corpus():
    vocabulary = [f"w{i}" for i in range(40)]
    records, extra = synthetic_mining_records(20, vocabulary)
    assert len(records) == 5 and all(len(r["positives"]) == 2 for r in records)
    assert 2 * len(records) + len(extra) == 20


def test_column_features_preprocess_each_column(tiny_model):
    features = column_features(tiny_model, [["a b", "c"], ["d e f"]], "cpu")
    assert [len(feature["input_ids"]) for feature in features] == [2, 1]


def test_method_clock_wraps_and_accumulates():
    class Owner:
        def encode(self, texts: list[str]) -> int:
            return len(texts)

    owner = Owner()
    clock = MethodClock(owner, "encode")
    assert owner.encode(["x", "y"]) == 2
    assert clock.seconds > 0.0


def test_fixed_ranges_are_sentence_transformers_mini_batches():
    # measurement.padding counts ST's mini-batches without importing its private helper: the two must agree.
    from sentence_transformers.base.losses.gradcache import _minibatch_ranges

    from measurement.padding import fixed_ranges

    for rows, mini in ((10, 3), (9, 3), (1, 32), (64, 32)):
        feature = {"input_ids": torch.zeros(rows, 4, dtype=torch.long)}
        assert fixed_ranges(rows, mini) == _minibatch_ranges(feature, mini)
