"""MultiPositiveCachedInfoNCELoss's teacher terms and sentence-transformers 6.x InfoNCE options (issue 30):
``directions``/``partition_mode``/``hardness_mode`` (equal to ST's MultipleNegativesRankingLoss at P = 1, a naive
reference for P > 1), distillation (equal to ST's DistillKLDivLoss at P = 1) and guide masking (equal to ST's
CachedGISTEmbedLoss at P = 1), under GradCache, length sorting, MatryoshkaLoss and bf16 replay.

float64 models where equality is exact up to rounding (tolerance 1e-9); float32 where a sentence-transformers loss
computes the cosine differently.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from loss_testing import (
    assert_grads_close,
    embed_columns,
    make_ir_columns,
    parameter_grads,
    tokenize_columns,
)
from sentence_transformers.sentence_transformer.losses import (
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from tiny_model import build_tiny_model

from codiemb_st import MultiPositiveCachedInfoNCELoss
from codiemb_st.losses.text_identity import hash_columns

ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def run_loss(model, loss_fn, columns, labels=None):
    model.zero_grad()
    loss = loss_fn(tokenize_columns(model, columns), labels)
    loss.backward()
    return loss.detach(), parameter_grads(model)


def assert_same_step(actual, expected, atol=1e-9, rtol=1e-9):
    torch.testing.assert_close(actual[0], expected[0], atol=atol, rtol=rtol)
    assert_grads_close(actual[1], expected[1], atol=atol, rtol=rtol)


# --- directions, partition_mode, hardness ------------------------------------------------------------------------


def reference_directions_loss(
    embeddings: list[torch.Tensor],
    num_positives: int,
    scale: float,
    directions: tuple[str, ...],
    partition_mode: str,
    hardness_mode: str | None = None,
    hardness_strength: float = 0.0,
) -> torch.Tensor:
    """Loop-by-loop transcription of the documented semantics for P >= 1 (distinct texts, no duplicate masking).

    For each positive slot k, sentence-transformers' MultipleNegativesRankingLoss with these options on
    (anchor, positive_k, negative_1..N): query_to_doc = every query's k-th positive and every hard negative (with the
    hardness penalty), query_to_query = every other query, doc_to_query = every query (for the row's k-th positive),
    doc_to_doc = every other row's k-th positive and hard negatives. Mean over slots, then over queries.
    """
    queries, candidates = embeddings[0], embeddings[1:]
    batch, num_columns = len(queries), len(candidates)
    negatives = range(num_positives, num_columns)

    def cos(a, b):
        return F.cosine_similarity(a, b, dim=0)

    def query_doc(i, j, c):
        value = cos(queries[i], candidates[c][j])
        own, positive = j == i, c < num_positives
        applies = {
            None: False,
            "in_batch_negatives": not own,
            "hard_negatives": own and not positive,
            "all_negatives": not (own and positive),
        }[hardness_mode]
        return value * scale + (hardness_strength * value.detach() if applies else 0.0)

    per_query = []
    for i in range(batch):
        per_slot = []
        for k in range(num_positives):
            parts = {
                "query_to_doc": [query_doc(i, j, c) for j in range(batch) for c in (k, *negatives)],
                "query_to_query": [cos(queries[i], queries[j]) * scale for j in range(batch) if j != i],
                "doc_to_query": [cos(candidates[k][i], queries[j]) * scale for j in range(batch)],
                "doc_to_doc": [
                    cos(candidates[k][i], candidates[c][j]) * scale
                    for j in range(batch)
                    if j != i
                    for c in (k, *negatives)
                ],
            }
            chosen = [torch.stack(parts[d]) for d in directions if parts[d]]
            if partition_mode == "joint":
                log_z = torch.logsumexp(torch.cat(chosen), 0)
            else:
                log_z = torch.stack([torch.logsumexp(part, 0) for part in chosen]).mean()
            per_slot.append(log_z - query_doc(i, i, k))
        per_query.append(torch.stack(per_slot).mean())
    return torch.stack(per_query).mean()


DIRECTION_SETTINGS = [
    (("query_to_doc",), "joint"),
    (("query_to_doc", "doc_to_query"), "per_direction"),
    (("query_to_doc", "doc_to_query"), "joint"),
    (("query_to_doc", "query_to_query"), "joint"),
    (("query_to_doc", "doc_to_doc"), "joint"),
    (ALL_DIRECTIONS, "joint"),
]
HARDNESS_SETTINGS = [(None, 0.0), ("in_batch_negatives", 9.0), ("hard_negatives", 5.0), ("all_negatives", 5.0)]


@pytest.mark.parametrize(("directions", "partition_mode"), DIRECTION_SETTINGS)
@pytest.mark.parametrize("num_negatives", [0, 2])
def test_directions_at_one_positive_equal_sentence_transformers_mnrl(directions, partition_mode, num_negatives):
    model = build_tiny_model(seed=11).double()
    columns = make_ir_columns(batch_size=6, num_positives=1, num_negatives=num_negatives, seed=3)
    options = {"directions": directions, "partition_mode": partition_mode}
    expected = run_loss(model, MultipleNegativesRankingLoss(model, scale=1 / 0.05, **options), columns)
    ours = MultiPositiveCachedInfoNCELoss(model, temperature=0.05, mini_batch_size=4, **options)
    assert_same_step(run_loss(model, ours, columns), expected)


@pytest.mark.parametrize(("hardness_mode", "hardness_strength"), HARDNESS_SETTINGS)
@pytest.mark.parametrize("directions", [("query_to_doc",), ALL_DIRECTIONS])
def test_hardness_at_one_positive_equals_sentence_transformers_mnrl_and_cmnrl(
    hardness_mode, hardness_strength, directions
):
    model = build_tiny_model(seed=12).double()
    columns = make_ir_columns(batch_size=7, num_positives=1, num_negatives=2, seed=4)
    options = {"directions": directions, "hardness_mode": hardness_mode, "hardness_strength": hardness_strength}
    expected = run_loss(model, MultipleNegativesRankingLoss(model, scale=20.0, **options), columns)
    cached = CachedMultipleNegativesRankingLoss(model, scale=20.0, mini_batch_size=3, **options)
    assert_same_step(run_loss(model, cached, columns), expected)
    ours = MultiPositiveCachedInfoNCELoss(model, temperature=0.05, mini_batch_size=3, **options)
    assert_same_step(run_loss(model, ours, columns), expected)


@pytest.mark.parametrize(
    ("directions", "partition_mode", "hardness_mode"),
    [
        (("query_to_doc",), "joint", "all_negatives"),
        (("query_to_doc", "doc_to_query"), "per_direction", "in_batch_negatives"),
        (ALL_DIRECTIONS, "joint", "hard_negatives"),
        (("query_to_doc", "doc_to_doc"), "joint", None),
    ],
)
@pytest.mark.parametrize("num_positives", [2, 3])
def test_directions_with_several_positives_equal_the_reference(
    directions, partition_mode, hardness_mode, num_positives
):
    model = build_tiny_model(seed=13).double()
    columns = make_ir_columns(batch_size=5, num_positives=num_positives, num_negatives=2, seed=num_positives)
    options = {
        "directions": directions,
        "partition_mode": partition_mode,
        "hardness_mode": hardness_mode,
        "hardness_strength": 5.0 if hardness_mode else 0.0,
    }
    model.zero_grad()
    expected_loss = reference_directions_loss(embed_columns(model, columns), num_positives, 50.0, **options)
    expected_loss.backward()
    expected = (expected_loss.detach(), parameter_grads(model))
    ours = MultiPositiveCachedInfoNCELoss(model, num_positives=num_positives, mini_batch_size=2, **options)
    assert_same_step(run_loss(model, ours, columns), expected)


def test_a_query_s_other_positives_are_never_its_negatives_in_any_direction():
    """Row 0's second positive made identical to its query: were it a negative of slot 1 in any direction (its
    similarity to the query is then 1), the loss would differ from the reference, which has no cross-slot terms."""
    model = build_tiny_model(seed=14).double()
    columns = make_ir_columns(batch_size=4, num_positives=2, num_negatives=1, seed=8)
    embeddings = [e.detach() for e in embed_columns(model, columns)]
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, directions=ALL_DIRECTIONS, mask_duplicates=False)
    base = loss_fn.compute_loss_from_embeddings(embeddings)
    # Make row 0's second positive identical to its query: with it as a negative anywhere, the loss would jump.
    moved = [e.clone() for e in embeddings]
    moved[2][0] = moved[0][0]
    changed = loss_fn.compute_loss_from_embeddings(moved)
    expected = reference_directions_loss(moved, 2, 50.0, ALL_DIRECTIONS, "joint")
    torch.testing.assert_close(changed, expected, atol=1e-9, rtol=1e-9)
    assert not torch.isclose(changed, base)


# --- GradCache, sorting, configuration ---------------------------------------------------------------------------


@pytest.mark.parametrize("mini_batch_size", [2, 3, 5, 50])
def test_new_options_do_not_depend_on_mini_batch_size(mini_batch_size):
    model = build_tiny_model(seed=15).double()
    columns = make_ir_columns(batch_size=7, num_positives=2, num_negatives=2, seed=5)
    columns[3][1] = columns[1][4]  # a duplicate, so duplicate masking takes part in every direction
    options = {"directions": ALL_DIRECTIONS, "hardness_mode": "all_negatives", "hardness_strength": 5.0}
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=mini_batch_size, **options)
    model.zero_grad()
    features = tokenize_columns(model, columns)
    uncached = loss_fn.compute_loss_from_embeddings(embed_columns(model, columns), hash_columns(features))
    uncached.backward()
    expected = (uncached.detach(), parameter_grads(model))
    for sort_by_length, keep_graphs in itertools.product((True, False), (0, 1)):
        loss_fn.sort_by_length, loss_fn.keep_graphs = sort_by_length, keep_graphs
        assert_same_step(run_loss(model, loss_fn, columns), expected)


def test_defaults_keep_the_loss_and_its_config():
    model = build_tiny_model(seed=16).double()
    columns = make_ir_columns(batch_size=5, num_positives=2, num_negatives=1, seed=6)
    plain = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=2)
    explicit = MultiPositiveCachedInfoNCELoss(
        model,
        num_positives=2,
        mini_batch_size=2,
        directions=("query_to_doc",),
        partition_mode="joint",
        hardness_mode=None,
        hardness_strength=0.0,
        distillation_weight=0.0,
        guide=None,
    )
    first, second = run_loss(model, plain, columns), run_loss(model, explicit, columns)
    assert torch.equal(first[0], second[0])
    assert all(torch.equal(first[1][name], second[1][name]) for name in first[1])
    # The new options appear in the config only when they are not the default (model cards stay as they were).
    assert set(plain.get_config_dict()) == {
        "num_positives",
        "temperature",
        "mini_batch_size",
        "mini_batch_num_tokens",
        "gather_across_devices",
        "objective",
        "mask_duplicates",
        "keep_graphs",
        "sort_by_length",
        "in_batch_negatives",
    }
    configured = MultiPositiveCachedInfoNCELoss(
        model, directions=ALL_DIRECTIONS, hardness_mode="hard_negatives", hardness_strength=5.0
    ).get_config_dict()
    assert configured["directions"] == ALL_DIRECTIONS and configured["hardness_mode"] == "hard_negatives"
    assert configured["hardness_strength"] == 5.0 and configured["partition_mode"] == "joint"


# --- distillation ------------------------------------------------------------------------------------------------


def teacher_scores(batch_size: int, num_candidates: int, seed: int = 0) -> torch.Tensor:
    """Cross-encoder-like scores (logits around 0-10), float32 as a dataset's `label` lists arrive."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch_size, num_candidates, generator=generator) * 10 - 2


def reference_distillation(embeddings, labels, student_temperature, teacher_temperature) -> torch.Tensor:
    """Listwise KL(teacher || student) over each query's own P + N candidates, batch mean, times s**2."""
    queries, candidates = embeddings[0], embeddings[1:]
    terms = []
    for i in range(len(queries)):
        student = torch.stack([F.cosine_similarity(queries[i], c[i], dim=0) for c in candidates]) / student_temperature
        teacher = torch.softmax(labels[i].double() / teacher_temperature, 0)
        terms.append((teacher * (teacher.log() - torch.log_softmax(student, 0))).sum())
    return torch.stack(terms).mean() * student_temperature**2


def difference(with_term, without_term):
    """(loss, grads) of the term alone: the loss with it minus the loss without it."""
    return with_term[0] - without_term[0], {name: with_term[1][name] - without_term[1][name] for name in with_term[1]}


@pytest.mark.parametrize(("student_temperature", "teacher_temperature"), [(1.0, 1.0), (0.05, 2.0), (0.02, 0.5)])
@pytest.mark.parametrize("num_negatives", [1, 3])
def test_distillation_at_one_positive_equals_sentence_transformers_distill_kl_div(
    student_temperature, teacher_temperature, num_negatives
):
    from sentence_transformers.sentence_transformer.losses import DistillKLDivLoss
    from sentence_transformers.util import pairwise_cos_sim

    model = build_tiny_model(seed=21).double()
    columns = make_ir_columns(batch_size=6, num_positives=1, num_negatives=num_negatives, seed=21)
    labels = teacher_scores(6, 1 + num_negatives).double()  # ST takes the teacher softmax in the labels' dtype
    weight = 0.7
    distill = DistillKLDivLoss(
        model,
        similarity_fct=pairwise_cos_sim,
        student_temperature=student_temperature,
        teacher_temperature=teacher_temperature,
    )
    expected_loss, expected_grads = run_loss(model, distill, columns, labels)
    options = {"student_temperature": student_temperature, "teacher_temperature": teacher_temperature}
    without = run_loss(model, MultiPositiveCachedInfoNCELoss(model, mini_batch_size=4), columns, labels)
    ours = MultiPositiveCachedInfoNCELoss(model, mini_batch_size=4, distillation_weight=weight, **options)
    term_loss, term_grads = difference(run_loss(model, ours, columns, labels), without)
    torch.testing.assert_close(term_loss, weight * expected_loss, atol=1e-9, rtol=1e-9)
    assert_grads_close(
        term_grads, {name: weight * grad for name, grad in expected_grads.items()}, atol=1e-9, rtol=1e-7
    )


@pytest.mark.parametrize("num_positives", [2, 3])
@pytest.mark.parametrize("mini_batch_size", [2, 3, 5, 50])
def test_distillation_with_several_positives_equals_the_listwise_reference(num_positives, mini_batch_size):
    model = build_tiny_model(seed=22).double()
    columns = make_ir_columns(batch_size=7, num_positives=num_positives, num_negatives=2, seed=22)
    labels = teacher_scores(7, num_positives + 2, seed=num_positives)
    model.zero_grad()
    embeddings = embed_columns(model, columns)
    infonce = MultiPositiveCachedInfoNCELoss(model, num_positives=num_positives).compute_loss_from_embeddings(
        embeddings
    )
    expected_loss = infonce + 0.5 * reference_distillation(embeddings, labels, 0.05, 2.0)
    expected_loss.backward()
    expected = (expected_loss.detach(), parameter_grads(model))
    ours = MultiPositiveCachedInfoNCELoss(
        model,
        num_positives=num_positives,
        mini_batch_size=mini_batch_size,
        distillation_weight=0.5,
        student_temperature=0.05,
        teacher_temperature=2.0,
    )
    assert_same_step(run_loss(model, ours, columns, labels), expected)


def test_distillation_scores_follow_their_rows_through_length_sorting():
    """Rows of very different lengths: sorting reorders every column; the scores must stay with their rows."""
    model = build_tiny_model(seed=23).double()
    columns = make_ir_columns(batch_size=6, num_positives=2, num_negatives=1, seed=23)
    for c, column in enumerate(columns):
        columns[c] = [text * (1 + (r * (c + 2)) % 4) for r, text in enumerate(column)]
    labels = teacher_scores(6, 3, seed=5)
    options = {"num_positives": 2, "mini_batch_size": 2, "distillation_weight": 1.0, "student_temperature": 0.05}
    unsorted = run_loss(model, MultiPositiveCachedInfoNCELoss(model, sort_by_length=False, **options), columns, labels)
    ours = MultiPositiveCachedInfoNCELoss(model, **options)
    assert_same_step(run_loss(model, ours, columns, labels), unsorted)
    # A permutation of the rows (with their scores) is the same batch.
    order = [3, 0, 5, 1, 4, 2]
    permuted = [[column[r] for r in order] for column in columns]
    assert_same_step(run_loss(model, ours, permuted, labels[order]), unsorted)
    # Scores moved to other rows change the loss: the term reads them per row.
    assert not torch.isclose(run_loss(model, ours, columns, labels[order])[0], unsorted[0])


def test_labels_are_ignored_without_distillation():
    """IR datasets with a `label` column (teacher scores kept for later) train unchanged when distillation is off."""
    model = build_tiny_model(seed=24).double()
    columns = make_ir_columns(batch_size=5, num_positives=2, num_negatives=1, seed=24)
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=2)
    expected = run_loss(model, loss_fn, columns)
    for labels in (teacher_scores(5, 3), torch.ones(5), torch.full((5, 7), float("nan"))):
        assert_same_step(run_loss(model, loss_fn, columns, labels), expected, atol=0, rtol=0)


# --- guide masking -----------------------------------------------------------------------------------------------


def build_guide(hidden_size: int = 48, retokenize: bool = False):
    """Another random tiny model as the guide (its own embedding size); ``retokenize``: a shorter max_seq_length,
    which makes the loss re-tokenize the decoded texts for it (CachedGISTEmbedLoss's rule)."""
    guide = build_tiny_model(seed=99, hidden_size=hidden_size).double()
    if retokenize:
        guide.max_seq_length = 32
    return guide


def reference_guided_loss(
    embeddings, guide_embeddings, num_positives, scale, margin_strategy="absolute", margin=0.0
) -> torch.Tensor:
    """Per-slot InfoNCE where every candidate whose guide similarity to the query exceeds that of the query's
    lowest positive minus the margin is dropped, the query's own positives never."""
    queries, candidates = embeddings[0], embeddings[1:]
    guide_queries, guide_candidates = guide_embeddings[0], guide_embeddings[1:]
    batch, num_columns = len(queries), len(candidates)

    def guide_sim(i, j, c):
        return F.cosine_similarity(guide_queries[i], guide_candidates[c][j], dim=0)

    per_query = []
    for i in range(batch):
        threshold = min(guide_sim(i, i, k) for k in range(num_positives))
        limit = threshold - margin if margin_strategy == "absolute" else threshold - abs(threshold) * margin

        def kept(j, c, i=i, limit=limit):
            return (j == i and c < num_positives) or not guide_sim(i, j, c) > limit

        per_slot = []
        for k in range(num_positives):
            logits = [
                F.cosine_similarity(queries[i], candidates[c][j], dim=0) * scale
                for j in range(batch)
                for c in (k, *range(num_positives, num_columns))
                if kept(j, c)
            ]
            positive = F.cosine_similarity(queries[i], candidates[k][i], dim=0) * scale
            per_slot.append(torch.logsumexp(torch.stack(logits), 0) - positive)
        per_query.append(torch.stack(per_slot).mean())
    return torch.stack(per_query).mean()


@pytest.mark.parametrize(
    ("margin_strategy", "margin", "retokenize", "num_negatives"),
    [
        ("absolute", 0.0, False, 2),
        ("absolute", 0.05, True, 1),
        ("relative", 0.1, False, 0),
        ("relative", 0.0, True, 3),
    ],
)
def test_guide_masking_at_one_positive_equals_cached_gist_embed_loss(
    margin_strategy, margin, retokenize, num_negatives
):
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss

    model, guide = build_tiny_model(seed=31).double(), build_guide(retokenize=retokenize)
    columns = make_ir_columns(batch_size=7, num_positives=1, num_negatives=num_negatives, seed=31)
    options = {"margin_strategy": margin_strategy, "margin": margin}
    gist = CachedGISTEmbedLoss(
        model, guide, temperature=0.05, mini_batch_size=3, contrast_anchors=False, contrast_positives=False, **options
    )
    assert gist.must_retokenize is retokenize
    expected = run_loss(model, gist, columns)
    ours = MultiPositiveCachedInfoNCELoss(model, temperature=0.05, mini_batch_size=3, guide=guide, **options)
    assert ours.guide_retokenizes is retokenize
    assert_same_step(run_loss(model, ours, columns), expected)
    unguided = run_loss(model, MultiPositiveCachedInfoNCELoss(model, temperature=0.05), columns)
    assert not torch.isclose(unguided[0], expected[0])  # the guide really masked something


def test_guide_with_query_to_query_equals_cached_gist_contrasting_anchors():
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss

    model, guide = build_tiny_model(seed=32).double(), build_guide()
    columns = make_ir_columns(batch_size=6, num_positives=1, num_negatives=1, seed=32)
    gist = CachedGISTEmbedLoss(model, guide, temperature=0.05, contrast_anchors=True, contrast_positives=False)
    ours = MultiPositiveCachedInfoNCELoss(
        model, temperature=0.05, guide=guide, directions=("query_to_doc", "query_to_query"), mini_batch_size=4
    )
    assert_same_step(run_loss(model, ours, columns), run_loss(model, gist, columns))


@pytest.mark.parametrize(("margin_strategy", "margin"), [("absolute", 0.0), ("absolute", -0.02), ("relative", 0.05)])
@pytest.mark.parametrize("num_positives", [2, 3])
def test_guide_masking_with_several_positives_equals_the_reference(margin_strategy, margin, num_positives):
    model, guide = build_tiny_model(seed=33).double(), build_guide(hidden_size=16)
    columns = make_ir_columns(batch_size=6, num_positives=num_positives, num_negatives=2, seed=33)
    model.zero_grad()
    guide_embeddings = [e.detach() for e in embed_columns(guide, columns)]
    expected_loss = reference_guided_loss(
        embed_columns(model, columns), guide_embeddings, num_positives, 50.0, margin_strategy, margin
    )
    expected_loss.backward()
    expected = (expected_loss.detach(), parameter_grads(model))
    ours = MultiPositiveCachedInfoNCELoss(
        model,
        num_positives=num_positives,
        mini_batch_size=4,
        guide=guide,
        margin_strategy=margin_strategy,
        margin=margin,
    )
    assert_same_step(run_loss(model, ours, columns), expected)


def test_guide_never_masks_a_query_s_own_positives():
    """An absolute margin of 3 puts the bar below any cosine: every candidate is masked except the query's own
    positives, so each slot's softmax holds its positive alone."""
    model, guide = build_tiny_model(seed=34).double(), build_guide()
    columns = make_ir_columns(batch_size=5, num_positives=2, num_negatives=2, seed=34)
    embeddings = [e.detach() for e in embed_columns(model, columns)]
    guide_embeddings = [e.detach() for e in embed_columns(guide, columns)]
    ours = MultiPositiveCachedInfoNCELoss(model, num_positives=2, guide=guide, margin=3.0)  # masks every negative
    loss = ours.compute_loss_from_embeddings(embeddings, guide_embeddings=guide_embeddings)
    assert loss.item() == 0.0


@pytest.mark.parametrize("mini_batch_size", [2, 3, 5, 50])
def test_all_terms_together_do_not_depend_on_mini_batch_size(mini_batch_size):
    model, guide = build_tiny_model(seed=35).double(), build_guide(retokenize=True)
    columns = make_ir_columns(batch_size=7, num_positives=2, num_negatives=2, seed=35)
    for c, column in enumerate(columns):  # uneven lengths, so length sorting reorders the rows
        columns[c] = [text * (1 + (r * (c + 3)) % 3) for r, text in enumerate(column)]
    labels = teacher_scores(7, 4, seed=35)
    options = {
        "num_positives": 2,
        "directions": ALL_DIRECTIONS,
        "hardness_mode": "in_batch_negatives",
        "hardness_strength": 9.0,
        "distillation_weight": 0.5,
        "student_temperature": 0.05,
        "guide": guide,
        "margin": 0.02,
    }
    loss_fn = MultiPositiveCachedInfoNCELoss(model, mini_batch_size=mini_batch_size, **options)
    model.zero_grad()
    features = tokenize_columns(model, columns)
    uncached = loss_fn.compute_loss_from_embeddings(
        embed_columns(model, columns),
        hash_columns(features),
        labels=labels,
        guide_embeddings=[e.detach() for e in embed_columns(guide, columns)],
    )
    uncached.backward()
    expected = (uncached.detach(), parameter_grads(model))
    for sort_by_length, keep_graphs in itertools.product((True, False), (0, 1)):
        loss_fn.sort_by_length, loss_fn.keep_graphs = sort_by_length, keep_graphs
        assert_same_step(run_loss(model, loss_fn, columns, labels), expected)


# --- MatryoshkaLoss, bf16 replay, trainer ------------------------------------------------------------------------


def all_terms(guide) -> dict:
    return {
        "num_positives": 2,
        "directions": ("query_to_doc", "doc_to_query"),
        "partition_mode": "per_direction",
        "hardness_mode": "hard_negatives",
        "hardness_strength": 5.0,
        "distillation_weight": 0.5,
        "student_temperature": 0.05,
        "guide": guide,
    }


def test_matryoshka_wrapping_applies_every_term_at_every_dimension():
    from sentence_transformers.sentence_transformer.losses import MatryoshkaLoss

    model, guide = build_tiny_model(seed=41).double(), build_guide()
    columns = make_ir_columns(batch_size=6, num_positives=2, num_negatives=2, seed=41)
    labels = teacher_scores(6, 4, seed=41)
    inner = MultiPositiveCachedInfoNCELoss(model, mini_batch_size=2, **all_terms(guide))
    dims, weights = [32, 16, 8], [1.0, 0.5, 0.25]
    wrapped = MatryoshkaLoss(model, inner, dims, matryoshka_weights=weights)
    actual = run_loss(model, wrapped, columns, labels)

    model.zero_grad()
    embeddings = embed_columns(model, columns)
    guide_embeddings = [e.detach() for e in embed_columns(guide, columns)]  # the guide is never truncated
    ids = hash_columns(tokenize_columns(model, columns))
    expected_loss = sum(
        weight
        * inner.compute_loss_from_embeddings(
            [e[:, :dim] for e in embeddings], ids, labels=labels, guide_embeddings=guide_embeddings
        )
        for dim, weight in zip(dims, weights)
    )
    expected_loss.backward()
    assert_same_step(actual, (expected_loss.detach(), parameter_grads(model)))


def test_bf16_replay_with_every_term_stays_close_to_float32():
    model, guide = build_tiny_model(seed=42), build_guide().float()
    columns = make_ir_columns(batch_size=8, num_positives=2, num_negatives=2, seed=42)
    labels = teacher_scores(8, 4, seed=42)
    seen = []
    model[0].auto_model.encoder.layer[0].intermediate.dense.register_forward_hook(
        lambda module, inputs, output: seen.append((torch.is_grad_enabled(), output.dtype))
    )
    # keep_graphs=0: every mini-batch replayed inside backward(), outside the autocast, as the trainer does.
    loss_fn = MultiPositiveCachedInfoNCELoss(model, mini_batch_size=3, keep_graphs=0, **all_terms(guide))

    def run(autocast: bool):
        model.zero_grad()
        seen.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = loss_fn(tokenize_columns(model, columns), labels)
        loss.backward()
        return loss.detach().float(), parameter_grads(model)

    reference_loss, reference_grads = run(autocast=False)
    loss, grads = run(autocast=True)
    replayed = [dtype for with_grad, dtype in seen if with_grad]
    assert len(replayed) == 5 * 3 and all(dtype == torch.bfloat16 for dtype in replayed)
    assert torch.isfinite(loss) and all(torch.isfinite(grad).all() for grad in grads.values())
    torch.testing.assert_close(loss, reference_loss, rtol=0.05, atol=0.0)
    # Attention key biases get (mathematically) zero gradients: only rounding noise there, so leave them out.
    largest = max(grad.norm() for grad in reference_grads.values())
    cosines = [
        F.cosine_similarity(grads[name].flatten(), reference_grads[name].flatten(), dim=0).item()
        for name in reference_grads
        if reference_grads[name].norm() > 1e-3 * largest
    ]
    assert min(cosines) > 0.9, sorted(cosines)[:3]


def test_trainer_reads_teacher_scores_from_a_label_column(tmp_path):
    """The data contract: a list column `label` of P + N floats, in the order positive_1..P, negative_1..N."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments

    model = build_tiny_model(seed=43)
    columns = make_ir_columns(batch_size=16, num_positives=2, num_negatives=1, seed=43)
    names = ["anchor", "positive_1", "positive_2", "negative_1"]
    scores = teacher_scores(16, 3, seed=43)
    dataset = Dataset.from_dict({**dict(zip(names, columns)), "label": scores.tolist()})
    loss_fn = MultiPositiveCachedInfoNCELoss(
        model, num_positives=2, mini_batch_size=4, distillation_weight=1.0, student_temperature=0.05
    )
    seen = []
    forward = loss_fn.forward

    def recording_forward(features, labels):
        seen.append(labels)
        return forward(features, labels)

    loss_fn.forward = recording_forward
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=8, report_to=[], save_strategy="no", seed=0
    )
    SentenceTransformerTrainer(model=model, args=args, train_dataset=dataset, loss=loss_fn).train()
    assert len(seen) == 2 and all(labels.shape == (8, 3) for labels in seen)
    rows = {tuple(row) for row in scores.tolist()}
    assert all(tuple(row) in rows for labels in seen for row in labels.tolist())


@pytest.mark.distributed
def test_two_process_gather_with_every_term_equals_single_process_full_batch(tiny_model_path, loss_rank_runs):
    """torchrun, 2 ranks, gloo: directions (queries gathered too), hardness, distillation and the guide (its
    candidates gathered) give the single-process full-batch loss and gradients."""
    from dist_jobs import job_output, teacher_terms_batch, teacher_terms_loss
    from sentence_transformers import SentenceTransformer

    batch = teacher_terms_batch()
    labels = torch.tensor(batch["labels"], dtype=torch.float64)
    model = SentenceTransformer(str(tiny_model_path), device="cpu").double()
    outputs = [torch.load(job_output(loss_rank_runs, "teacher_terms") / f"rank{rank}.pt") for rank in range(2)]
    for index, config in enumerate(batch["configs"]):
        expected = run_loss(model, teacher_terms_loss(model, str(tiny_model_path), config), batch["columns"], labels)
        # Each rank's loss is the mean over its own rows; their average is the full-batch mean.
        ranks = [output[index] for output in outputs]
        torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, expected[0], atol=1e-9, rtol=1e-9)
        for output in ranks:  # DDP-averaged gradients equal the single-process gradients, on every rank
            assert_grads_close(output["grads"], expected[1])
