"""Length-aware embedding (``sort_by_length``) in both losses: columns embedded in length-sorted chunks, each trimmed to
its own padding, give the loss and gradients of the unsorted computation and of sentence-transformers' uncached
losses.

Everything runs in float64 so that "equal" means equal up to rounding. ``CHUNK_OVERHEAD_TOKENS`` is lowered so that
the tiny batches here are cut into several chunks (on the CPU a boundary must otherwise save 64 padded tokens).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from loss_testing import assert_grads_close, parameter_grads, random_texts, tokenize_columns
from sentence_transformers import util
from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss, MultipleNegativesRankingLoss
from tiny_decoder import QUERY_PROMPT, build_tiny_decoder
from tiny_model import build_tiny_model

from codiemb_st import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss
from codiemb_st.losses import length_order
from codiemb_st.losses.length_order import (
    chunk_feature,
    keeps_positions_with_position_ids,
    padding_chunks,
    restore_order,
    sort_by_length,
)

TEMPERATURE = 0.05


@pytest.fixture(autouse=True)
def small_chunk_overhead(monkeypatch):
    monkeypatch.setattr(length_order, "CHUNK_OVERHEAD_TOKENS", 2)


def uneven_columns(batch_size: int, num_columns: int, seed: int) -> list[list[str]]:
    """Distinct texts of 1 to 14 words, so that sorting changes the order and the chunk widths."""
    texts = random_texts(batch_size * num_columns, seed, length=14)
    rng = random.Random(seed)
    texts = [" ".join(text.split()[: rng.randint(1, 14)]) for text in texts]
    texts = [f"{text} {index}" for index, text in enumerate(texts)]  # keep them distinct after the cut
    return [texts[c * batch_size : (c + 1) * batch_size] for c in range(num_columns)]


class TokenCounter:
    """Counts the real and the embedded (padded) tokens of every forward call of a model's first module."""

    def __init__(self, model) -> None:
        self.real = self.embedded = self.calls = 0
        self.position_ids_seen = False
        model[0].register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        mask = args[0]["attention_mask"]
        self.real += int(mask.sum())
        self.embedded += mask.numel()
        self.calls += 1
        self.position_ids_seen |= "position_ids" in args[0]


def run(model, loss_fn, features_or_columns, labels=None, scale: float = 1.0):
    model.zero_grad()
    features = features_or_columns
    if isinstance(features_or_columns[0], list):
        features = tokenize_columns(model, features_or_columns)
    loss = loss_fn(features, labels)
    (loss * scale).backward()
    return loss.detach(), parameter_grads(model)


# ---------------------------------------------------------------------------------------------------------------- helpers


def test_sort_and_restore_round_trip_keep_row_metadata():
    model = build_tiny_model(seed=1)
    columns = uneven_columns(6, 1, seed=1)
    features = model.tokenize(columns[0])
    features["prompt_length"] = torch.arange(6)  # per-row metadata follows its row
    sorted_features, order = sort_by_length(features)
    lengths = sorted_features["attention_mask"].sum(1)
    assert order is not None and (lengths[:-1] <= lengths[1:]).all()  # shortest first
    assert torch.equal(sorted_features["prompt_length"], order)
    assert torch.equal(restore_order(sorted_features["input_ids"], order), features["input_ids"])
    # Already sorted, or not a plain padded feature: returned as it is.
    assert sort_by_length(sorted_features)[1] is None
    flattened = {"input_ids": torch.arange(5)[None], "cu_seq_lens_q": torch.tensor([0, 2, 5])}
    assert sort_by_length(flattened) == (flattened, None)


def test_padding_chunks_minimise_padded_tokens_plus_overhead():
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 7)
        lengths = sorted(rng.randint(1, 30) for _ in range(n))
        max_rows, overhead = rng.randint(1, n), rng.randint(0, 20)
        ranges = padding_chunks(lengths, max_rows, overhead_tokens=overhead)
        assert [begin for begin, _ in ranges] == [0] + [end for _, end in ranges[:-1]] and ranges[-1][1] == n

        def cost(rs, lengths=lengths, overhead=overhead):
            return sum((end - begin) * lengths[end - 1] + overhead for begin, end in rs)

        best = min(
            cost(list(zip((0, *cuts), (*cuts, n))))
            for k in range(n)
            for cuts in itertools.combinations(range(1, n), k)
            if all(end - begin <= max_rows for begin, end in zip((0, *cuts), (*cuts, n)))
        )
        assert cost(ranges) == best and all(end - begin <= max_rows for begin, end in ranges)
    assert padding_chunks([9] * 8, 8, overhead_tokens=1) == [(0, 8)]  # uniform lengths: one chunk


def test_chunk_feature_trims_trailing_padding_and_leading_padding_only_with_positions():
    encoder = build_tiny_model(seed=2)
    features = encoder.tokenize(["a man", "the quick brown fox jumps over the lazy dog"])
    assert not keeps_positions_with_position_ids(encoder)
    chunk = chunk_feature(features, 0, 1, keep_positions=False)
    assert chunk["input_ids"].shape == (1, int(features["attention_mask"][0].sum())) and "position_ids" not in chunk

    decoder = build_tiny_decoder(seed=2)
    assert keeps_positions_with_position_ids(decoder)
    features = decoder.tokenize(["a man", "the quick brown fox jumps over the lazy dog"])
    width, short = features["attention_mask"].shape[1], int(features["attention_mask"][0].sum())
    chunk = chunk_feature(features, 0, 1, keep_positions=True)
    assert chunk["attention_mask"].all() and chunk["input_ids"].shape == (1, short)
    assert chunk["position_ids"].tolist() == [list(range(width - short, width))]
    assert chunk_feature(features, 0, 1, keep_positions=False)["input_ids"].shape == (1, width)


# ------------------------------------------------------------------------------------------------------------ IR loss

IR_PATHS = [
    pytest.param({"mini_batch_size": 64}, id="single-pass-chunks"),
    pytest.param({"mini_batch_size": 3}, id="kept-graph"),
    pytest.param({"mini_batch_size": 3, "keep_graphs": 0}, id="plain-passes"),
    pytest.param({"mini_batch_size": 64, "mini_batch_num_tokens": 40}, id="token-budget"),
]


@pytest.mark.parametrize("kwargs", IR_PATHS)
def test_ir_sorted_equals_unsorted_and_sentence_transformers_mnrl(kwargs):
    model = build_tiny_model(seed=3).double()
    counter = TokenCounter(model)
    columns = uneven_columns(9, 3, seed=3)
    common = {"num_positives": 1, "temperature": TEMPERATURE, "mask_duplicates": False, **kwargs}
    expected_loss, expected_grads = run(model, MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE), columns)

    counter.real = counter.embedded = 0
    unsorted_loss, unsorted_grads = run(
        model, MultiPositiveCachedInfoNCELoss(model, **common, sort_by_length=False), columns
    )
    unsorted_tokens = counter.embedded
    counter.real = counter.embedded = 0
    loss, grads = run(model, MultiPositiveCachedInfoNCELoss(model, **common), columns)

    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(loss, unsorted_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)
    assert_grads_close(grads, unsorted_grads)
    assert counter.embedded < unsorted_tokens  # less padding embedded (both passes counted)


@pytest.mark.parametrize(("mini_batch_size", "keep_graphs"), [(3, 1), (3, 0), (2, 4)])
def test_ir_dropout_first_pass_and_replay_are_identical(mini_batch_size, keep_graphs):
    """Sorted mini-batches under dropout: the replay reproduces the first pass bit for bit, the kept graphs hold the
    masks the plain passes draw, and the training RNG stream after the step is the plain passes' one."""
    model = build_tiny_model(seed=4, dropout=0.3).double()
    model.train()
    columns = uneven_columns(7, 3, seed=4)
    kwargs = {"num_positives": 1, "mini_batch_size": mini_batch_size}

    def recorded_step(loss_fn):
        recorded = {False: [], True: []}
        embed_minibatch = loss_fn.embed_minibatch

        def recording(*args, **kw):
            reps, state = embed_minibatch(*args, **kw)
            recorded[kw["with_grad"]].append(reps.detach().clone())
            return reps, state

        loss_fn.embed_minibatch = recording
        torch.manual_seed(7)
        loss, grads = run(model, loss_fn, columns)
        return loss, grads, recorded, torch.get_rng_state()

    plain_loss, plain_grads, plain, plain_rng = recorded_step(
        MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=0)
    )
    loss, grads, ours, rng = recorded_step(MultiPositiveCachedInfoNCELoss(model, **kwargs, keep_graphs=keep_graphs))
    for before, after in zip(plain[False], plain[True]):  # plain passes: replay == first pass
        assert torch.equal(before, after)
    num_replayed = len(ours[False])
    kept = ours[True][: len(plain[False]) - num_replayed]
    for before, after in zip(plain[False], ours[False] + kept):  # our first pass == the plain first pass
        assert torch.equal(before, after)
    for before, after in zip(ours[False], ours[True][len(kept) :]):  # and our replay reproduces it
        assert torch.equal(before, after)
    assert torch.equal(loss, plain_loss) and torch.equal(rng, plain_rng)
    assert_grads_close(grads, plain_grads)


@pytest.mark.parametrize("mini_batch_size", [64, 3])
def test_ir_gradient_accumulation_scales_sorted_chunks(mini_batch_size):
    model = build_tiny_model(seed=5).double()
    micro = [uneven_columns(5, 3, seed=s) for s in (5, 6)]
    reference = MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE)
    singles = [run(model, reference, columns)[1] for columns in micro]
    expected = {name: (singles[0][name] + singles[1][name]) / 2 for name in singles[0]}
    loss_fn = MultiPositiveCachedInfoNCELoss(
        model, num_positives=1, temperature=TEMPERATURE, mask_duplicates=False, mini_batch_size=mini_batch_size
    )
    model.zero_grad()
    for columns in micro:
        (loss_fn(tokenize_columns(model, columns), None) / 2).backward()
    assert_grads_close(parameter_grads(model), expected)


@pytest.mark.parametrize("mini_batch_size", [64, 2])
def test_matryoshka_wrapping_sorted_equals_unsorted(mini_batch_size):
    model = build_tiny_model(seed=6).double()
    columns = uneven_columns(6, 3, seed=6)

    def wrapped(sort: bool):
        inner = MultiPositiveCachedInfoNCELoss(
            model, num_positives=2, mini_batch_size=mini_batch_size, sort_by_length=sort
        )
        return MatryoshkaLoss(model, inner, [32, 16, 8])

    expected_loss, expected_grads = run(model, wrapped(False), columns)
    loss, grads = run(model, wrapped(True), columns)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)

    pairs, labels = uneven_columns(8, 2, seed=7), torch.linspace(0, 5, 8, dtype=torch.float64)
    sts = [MatryoshkaLoss(model, PearsonSpearmanLoss(model, sort_by_length=s), [32, 16]) for s in (False, True)]
    expected_loss, expected_grads = run(model, sts[0], pairs, labels)
    loss, grads = run(model, sts[1], pairs, labels)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)


# ---------------------------------------------------------------------------------------------------------- STS loss


@pytest.mark.parametrize("mid_nce_weight", [0.0, 1.0])
def test_sts_sorted_chunks_equal_unsorted_and_one_forward_per_column(mid_nce_weight):
    model = build_tiny_model(seed=8).double()
    counter = TokenCounter(model)
    pairs = uneven_columns(10, 2, seed=8)
    labels = torch.tensor([4.5, 0.2, 3.1, 1.0, 2.2, 5.0, 0.0, 3.7, 1.5, 2.9], dtype=torch.float64)
    # The reference formula on one forward per column (as CoSENTLoss embeds), then the terms.
    model.zero_grad()
    reference = PearsonSpearmanLoss(model, mid_nce_weight=mid_nce_weight, sort_by_length=False)
    features = tokenize_columns(model, pairs)
    if mid_nce_weight:
        final, middle = reference.embed_with_middle_layer(features)
    else:
        final, middle = [model(f)["sentence_embedding"] for f in features], None
    scores = util.pairwise_cos_sim(*final)
    expected_loss = reference.compute_loss_from_scores(scores, labels, middle_embeddings=middle)
    expected_loss.backward()
    expected_grads = parameter_grads(model)

    counter.embedded = counter.calls = 0
    loss, grads = run(model, PearsonSpearmanLoss(model, mid_nce_weight=mid_nce_weight), pairs, labels)
    torch.testing.assert_close(loss, expected_loss.detach(), atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)
    assert counter.calls > 2  # several chunks per column
    assert counter.embedded < sum(f["attention_mask"].numel() for f in features)


# ------------------------------------------------------------------------------------------------ left-padded decoders


def decoder_features(model, columns):
    features = [model.tokenize([QUERY_PROMPT + text for text in columns[0]])]
    features[0]["prompt_length"] = torch.full(
        (len(columns[0]),), model[0]._get_prompt_length(QUERY_PROMPT), dtype=torch.long
    )
    return features + [model.tokenize(column) for column in columns[1:]]


@pytest.mark.parametrize(("pooling_mode", "include_prompt"), [("lasttoken", True), ("mean", False)])
def test_left_padded_decoder_keeps_positions(pooling_mode, include_prompt):
    model = build_tiny_decoder(seed=9, pooling_mode=pooling_mode, include_prompt=include_prompt).double()
    counter = TokenCounter(model)
    columns = uneven_columns(6, 2, seed=9)
    # IR: the uncached MNRL reference vs length-sorted single-pass chunks and sorted cached mini-batches.
    expected_loss, expected_grads = run(
        model, MultipleNegativesRankingLoss(model, scale=1 / TEMPERATURE), decoder_features(model, columns)
    )
    for mini_batch_size in (64, 2):
        counter.position_ids_seen = False
        loss_fn = MultiPositiveCachedInfoNCELoss(
            model, num_positives=1, temperature=TEMPERATURE, mask_duplicates=False, mini_batch_size=mini_batch_size
        )
        loss, grads = run(model, loss_fn, decoder_features(model, columns))
        torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
        assert_grads_close(grads, expected_grads)
        assert counter.position_ids_seen  # leading padding was trimmed, with the positions given explicitly

    # STS with the middle-layer term: sorted chunks vs one forward per column.
    labels = torch.tensor([0.1, 4.0, 2.5, 3.3, 1.2, 5.0], dtype=torch.float64)
    expected_loss, expected_grads = run(
        model, PearsonSpearmanLoss(model, sort_by_length=False), decoder_features(model, columns), labels
    )
    loss, grads = run(model, PearsonSpearmanLoss(model), decoder_features(model, columns), labels)
    torch.testing.assert_close(loss, expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(grads, expected_grads)


def test_sort_by_length_must_be_a_bool(tiny_model):
    with pytest.raises(TypeError, match="sort_by_length"):
        MultiPositiveCachedInfoNCELoss(tiny_model, sort_by_length="yes")
    with pytest.raises(TypeError, match="sort_by_length"):
        PearsonSpearmanLoss(tiny_model, sort_by_length=1)
    assert MultiPositiveCachedInfoNCELoss(tiny_model).get_config_dict()["sort_by_length"] is True
