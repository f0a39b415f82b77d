from __future__ import annotations

import json
import logging

import pytest
import torch
from datasets import Dataset, DatasetDict
from dist_jobs import job_output
from scipy.stats import rankdata, spearmanr
from sentence_transformers import (
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
    util,
)
from sentence_transformers.sentence_transformer.losses import AdaptiveLayerLoss, CoSENTLoss, MatryoshkaLoss
from sentence_transformers.sentence_transformer.modules import Pooling, StaticEmbedding
from tiny_model import ENGLISH_SENTENCES, build_tiny_decoder, build_tiny_model, build_tokenizer
from transformers.modeling_outputs import BaseModelOutput

from codiemb_st import PearsonSpearmanLoss
from codiemb_st.losses.pearson_spearman import average_ranks, mid_nce_loss, pearson_loss, pro_loss, rank_kl_loss

T = 0.05


# --- Reference: a direct, loop-based transcription of the official CoDiEmb formulas (float64, scipy ranking) ---


def reference_pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.numel() == 0 or y.min() == y.max():
        return torch.tensor(0.0, dtype=x.dtype)
    mean_x, mean_y = x.mean(), y.mean()
    var_x, var_y = torch.var(x, unbiased=False), torch.var(y, unbiased=False)
    return 1 - torch.mean((x - mean_x) * (y - mean_y)) / (torch.sqrt(var_x) * torch.sqrt(var_y))


def reference_rank_kl(x: torch.Tensor, y: torch.Tensor, temperature: float = T) -> torch.Tensor:
    n = y.numel()
    ranks = torch.from_numpy(rankdata(-y.numpy(), method="average") - 1)
    ideal = (n - 1 - ranks) / (n - 1)
    target = torch.softmax(ideal / temperature, dim=0)
    log_predicted = torch.log_softmax(x / temperature, dim=0)
    total = torch.tensor(0.0, dtype=x.dtype)
    for i in range(n):
        total = total + target[i] * (torch.log(target[i]) - log_predicted[i])
    return total / n


def reference_pro(x: torch.Tensor, y: torch.Tensor, temperature: float = T, eps: float = 1e-8) -> torch.Tensor:
    x = x / temperature
    order = torch.argsort(y, descending=True)
    y_sorted, x_sorted = y[order], x[order]
    total, count = 0.0, 0
    for k in range(len(y) - 1):
        tail_y, tail_x = y_sorted[k + 1 :], x_sorted[k + 1 :]
        mask = (y_sorted[k] - tail_y) > eps
        if not mask.any():
            continue
        weights = y_sorted[k] - tail_y[mask]
        logits = torch.cat([(x_sorted[k] * weights.max()).unsqueeze(0), tail_x[mask] * weights])
        total = total + torch.log_softmax(logits, dim=0)[0]
        count += 1
    if count == 0:
        return torch.tensor(0.0, dtype=x.dtype)
    return -total / count


def reference_total(x, y, weights=(2.0, 5.0, 0.5), temperature=T):
    return (
        weights[0] * reference_pearson(x, y)
        + weights[1] * reference_rank_kl(x, y, temperature)
        + weights[2] * reference_pro(x, y, temperature)
    )


def random_batch(n: int, seed: int, levels: int | None = 6):
    """Cosine-like scores in [-1, 1] and gold labels: `levels` graded values (many ties) or continuous with ties."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand(n, generator=generator, dtype=torch.float64) * 2 - 1
    if levels is None:
        labels = torch.rand(n, generator=generator, dtype=torch.float64) * 5
        labels[: n // 3] = labels[n // 3 : 2 * (n // 3)]  # force some exact ties among continuous values
    else:
        labels = torch.randint(0, levels, (n,), generator=generator).double() * 0.8
    return scores, labels


def value_and_grad(fn, scores, labels):
    scores = scores.clone().requires_grad_(True)
    value = fn(scores, labels)
    if not value.requires_grad:  # the reference returns a detached 0 for degenerate batches
        return value, torch.zeros_like(scores)
    (grad,) = torch.autograd.grad(value, scores)
    return value.detach(), grad


TERMS = [
    ("pearson", pearson_loss, reference_pearson),
    ("rank_kl", lambda s, y: rank_kl_loss(s, y, T), reference_rank_kl),
    ("pro_grouped", lambda s, y: pro_loss(s, y, T, group_tied_labels=True), reference_pro),
    ("pro_dense", lambda s, y: pro_loss(s, y, T, group_tied_labels=False), reference_pro),
    # Tiny chunks: one or two matrix rows at a time, column trimming on every chunk.
    ("pro_grouped_chunked", lambda s, y: pro_loss(s, y, T, group_tied_labels=True, chunk_elements=50), reference_pro),
    ("pro_dense_chunked", lambda s, y: pro_loss(s, y, T, group_tied_labels=False, chunk_elements=50), reference_pro),
]


@pytest.mark.parametrize("n", [2, 3, 8, 37, 96])
@pytest.mark.parametrize("levels", [2, 6, None])
@pytest.mark.parametrize(("name", "term", "reference"), TERMS, ids=[t[0] for t in TERMS])
def test_terms_match_loop_reference(name, term, reference, n, levels):
    scores, labels = random_batch(n, seed=n * 10 + (levels or 0), levels=levels)
    value, grad = value_and_grad(term, scores, labels)
    ref_value, ref_grad = value_and_grad(reference, scores, labels)
    assert torch.allclose(value, ref_value, rtol=0, atol=1e-6), (value, ref_value)
    assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-6), (grad - ref_grad).abs().max()


def test_terms_are_nontrivial_on_test_data():
    # Guards the parity test against comparing zeros with zeros.
    scores, labels = random_batch(37, seed=1)
    for _, term, _ in TERMS:
        value, grad = value_and_grad(term, scores, labels)
        assert value.abs() > 1e-3 and grad.abs().max() > 1e-3


GRADCHECK_TERMS = {
    "pearson": pearson_loss,
    "rank_kl": lambda s, y: rank_kl_loss(s, y, 0.5),
    "pro_grouped": lambda s, y: pro_loss(s, y, 0.5, group_tied_labels=True, chunk_elements=30),
    "pro_dense": lambda s, y: pro_loss(s, y, 0.5, group_tied_labels=False, chunk_elements=30),
}


@pytest.mark.parametrize("name", list(GRADCHECK_TERMS))
def test_hand_written_backward_passes_gradcheck(name):
    # Every term has a closed-form backward (PRO's recomputed chunk by chunk); check it against finite differences.
    scores, labels = random_batch(12, seed=2, levels=4)
    assert torch.autograd.gradcheck(lambda s: GRADCHECK_TERMS[name](s, labels), (scores.requires_grad_(True),))


def test_average_ranks_match_scipy():
    _, labels = random_batch(200, seed=3, levels=None)
    expected = torch.from_numpy(rankdata(-labels.numpy(), method="average") - 1)
    assert torch.equal(average_ranks(labels), expected)
    assert torch.equal(average_ranks(torch.tensor([3, 1, 3, 2])), torch.tensor([0.5, 3.0, 0.5, 2.0]))


def test_full_loss_matches_reference_through_model(tiny_model):
    # The whole module path: tokenised columns -> embeddings -> cosine -> terms, parameter gradients included.
    # (The four-term loss with the middle-layer term has its own tests below.)
    model = tiny_model.double()
    sentences1 = ["a man is playing a guitar", "the weather is sunny", "stock markets fell", "children play", "a dog"]
    sentences2 = ["a man plays guitar on the stage", "it is warm today", "children are playing", "the fox", "a dog"]
    labels = torch.tensor([4.0, 3.2, 0.0, 1.0, 5.0], dtype=torch.float64)
    features = [model.preprocess(sentences1), model.preprocess(sentences2)]

    loss = PearsonSpearmanLoss(model, mid_nce_weight=0.0)(features, labels)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    embeddings = [model(f)["sentence_embedding"] for f in features]
    reference = reference_total(util.pairwise_cos_sim(*embeddings), labels)
    reference.backward()
    assert torch.allclose(loss, reference, rtol=0, atol=1e-10)
    for grad, param in zip(grads, model.parameters()):
        assert torch.allclose(grad, param.grad, rtol=0, atol=1e-10)


def test_weights_and_temperature_are_applied():
    scores, labels = random_batch(30, seed=4)
    loss = PearsonSpearmanLoss(None, pearson_weight=1.5, rank_kl_weight=0.3, pro_weight=2.0, temperature=0.1)
    expected = reference_total(scores, labels, weights=(1.5, 0.3, 2.0), temperature=0.1)
    assert torch.allclose(loss.compute_loss_from_scores(scores, labels), expected, rtol=0, atol=1e-10)


def test_return_dict_terms_sum_to_total_and_skip_zero_weights():
    scores, labels = random_batch(30, seed=5)
    terms = PearsonSpearmanLoss(None, return_dict=True).compute_loss_from_scores(scores, labels)
    assert list(terms) == ["pearson_loss", "rank_kl_loss", "pro_loss"]
    assert torch.allclose(terms["pearson_loss"], 2.0 * reference_pearson(scores, labels), atol=1e-10)
    assert torch.allclose(terms["rank_kl_loss"], 5.0 * reference_rank_kl(scores, labels), atol=1e-10)
    assert torch.allclose(terms["pro_loss"], 0.5 * reference_pro(scores, labels), atol=1e-10)
    total = PearsonSpearmanLoss(None).compute_loss_from_scores(scores, labels)
    assert torch.allclose(sum(terms.values()), total, atol=1e-12)

    only_kl = PearsonSpearmanLoss(None, pearson_weight=0.0, pro_weight=0.0, return_dict=True)
    assert list(only_kl.compute_loss_from_scores(scores, labels)) == ["rank_kl_loss"]


# --- Invariances ---


def test_pearson_and_rank_kl_invariant_to_increasing_affine_label_map():
    scores, labels = random_batch(40, seed=6)
    loss = PearsonSpearmanLoss(None, pro_weight=0.0)
    base = loss.compute_loss_from_scores(scores, labels)
    for scale, shift in [(5.0, 0.0), (0.2, -1.0), (3.0, 7.5)]:
        assert torch.allclose(loss.compute_loss_from_scores(scores, scale * labels + shift), base, atol=1e-10)
    # A decreasing map reverses the order: not invariant.
    assert not torch.allclose(loss.compute_loss_from_scores(scores, -labels), base, atol=1e-3)


def test_rank_kl_invariant_to_any_strictly_increasing_label_map():
    scores, labels = random_batch(40, seed=7, levels=None)
    base = rank_kl_loss(scores, labels, T)
    for mapped in [
        labels.exp(),
        labels**3,
        torch.sigmoid(10 * (labels - 2)),
        torch.from_numpy(rankdata(labels.numpy(), method="dense")).double(),
    ]:
        assert torch.allclose(rank_kl_loss(scores, mapped, T), base, atol=1e-12)
    # Pearson is not: a non-affine map changes it (shows the two invariance tests are not vacuous).
    assert not torch.allclose(pearson_loss(scores, labels.exp()), pearson_loss(scores, labels), atol=1e-3)


def test_pro_depends_on_label_scale_like_an_inverse_temperature():
    # Documented: PRO's weights are raw label gaps, so scaling labels by c equals dividing T by c; shifts are free.
    scores, labels = random_batch(40, seed=8)
    assert torch.allclose(pro_loss(scores, 5 * labels, T), pro_loss(scores, labels, T / 5), atol=1e-10)
    assert torch.allclose(pro_loss(scores, labels + 3.0, T), pro_loss(scores, labels, T), atol=1e-10)
    assert not torch.allclose(pro_loss(scores, 5 * labels, T), pro_loss(scores, labels, T), atol=1e-3)


# --- Degenerate batches and bad input ---


def test_constant_labels_give_zero_for_undefined_terms_and_no_nan():
    scores = torch.tensor([0.3, -0.2, 0.9, 0.1], dtype=torch.float64, requires_grad=True)
    for value in [0.0, 1.0, 0.1]:  # 0.1 * 4 / 4 is not exactly 0.1 in floating point
        labels = torch.full((4,), value, dtype=torch.float64)
        terms = PearsonSpearmanLoss(None, return_dict=True).compute_loss_from_scores(scores, labels)
        assert terms["pearson_loss"].item() == 0.0
        assert terms["pro_loss"].item() == 0.0
        # Rank-KL is defined (uniform target), as in the official code.
        assert torch.allclose(terms["rank_kl_loss"], 5.0 * reference_rank_kl(scores.detach(), labels), atol=1e-12)
        (grad,) = torch.autograd.grad(sum(terms.values()), scores)
        assert torch.isfinite(grad).all()


def test_constant_scores_give_finite_loss_and_gradients():
    # A collapsed model: r is undefined, so the Pearson term is 1 - 0 without gradient (the official code gives NaN).
    scores = torch.full((6,), 0.5, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    value, grad = value_and_grad(pearson_loss, scores.detach(), labels)
    assert value.item() == 1.0 and torch.equal(grad, torch.zeros_like(grad))
    for dtype in (torch.float64, torch.float32):
        loss = PearsonSpearmanLoss(None).compute_loss_from_scores(scores.to(dtype), labels)
        (grad,) = torch.autograd.grad(loss, scores)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()


def test_batch_of_two_matches_reference():
    scores = torch.tensor([0.8, 0.1], dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    loss = PearsonSpearmanLoss(None).compute_loss_from_scores(scores, labels)
    assert torch.allclose(loss, reference_total(scores, labels), atol=1e-10)
    # Two points are perfectly correlated: only the rank-KL and PRO terms remain.
    assert pearson_loss(scores, labels).abs() < 1e-12


@pytest.mark.parametrize("n", [0, 1])
def test_fewer_than_two_pairs_give_zero_loss_with_warning(n, caplog):
    scores = torch.rand(n, dtype=torch.float64, requires_grad=True)
    labels = torch.rand(n, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="codiemb_st.losses.pearson_spearman"):
        loss = PearsonSpearmanLoss(None).compute_loss_from_scores(scores, labels)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, scores)
    assert torch.equal(grad, torch.zeros_like(grad))
    assert "dataloader_drop_last" in caplog.text


@pytest.mark.parametrize("term", [pearson_loss, lambda s, y: rank_kl_loss(s, y, T), lambda s, y: pro_loss(s, y, T)])
def test_term_functions_reject_bad_shapes(term):
    with pytest.raises(ValueError, match="at least 2"):
        term(torch.tensor([0.5]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="same shape"):
        term(torch.rand(4), torch.rand(5))
    with pytest.raises(ValueError, match="1-D"):
        term(torch.rand(2, 2), torch.rand(2, 2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_labels_raise(bad):
    scores, labels = random_batch(8, seed=9)
    labels[3] = bad
    with pytest.raises(ValueError, match="NaN or infinite gold scores"):
        PearsonSpearmanLoss(None).compute_loss_from_scores(scores, labels)


def test_missing_or_misshaped_labels_and_wrong_columns_raise(tiny_model):
    loss = PearsonSpearmanLoss(tiny_model)
    features = [tiny_model.preprocess(["a b", "c d"]), tiny_model.preprocess(["e f", "g h"])]
    with pytest.raises(ValueError, match="'score'"):
        loss(features, None)
    with pytest.raises(ValueError, match="expects 2 labels"):
        loss(features, torch.tensor([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="exactly 2 text columns"):
        loss(features + [tiny_model.preprocess(["i j", "k l"])], torch.tensor([1.0, 2.0]))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"pearson_weight": -1.0}, ValueError, "pearson_weight"),
        ({"pro_weight": float("nan")}, ValueError, "pro_weight"),
        ({"rank_kl_weight": "5"}, TypeError, "rank_kl_weight"),
        ({"rank_kl_weight": True}, TypeError, "rank_kl_weight"),
        ({"pearson_weight": 0, "rank_kl_weight": 0, "pro_weight": 0, "mid_nce_weight": 0}, ValueError, "At least one"),
        ({"temperature": 0.0}, ValueError, "temperature"),
        ({"mid_nce_weight": -0.5}, ValueError, "mid_nce_weight"),
        ({"mid_nce_weight": float("inf")}, ValueError, "mid_nce_weight"),
        ({"mid_nce_temperature": 0.0}, ValueError, "mid_nce_temperature"),
        ({"mid_nce_temperature": "0.02"}, TypeError, "mid_nce_temperature"),
        ({"mid_nce_threshold": float("nan")}, ValueError, "mid_nce_threshold"),
        ({"mid_nce_threshold": None}, TypeError, "mid_nce_threshold"),
        ({"mid_nce_layer": 1.0}, TypeError, "mid_nce_layer"),
        ({"mid_nce_layer": True}, TypeError, "mid_nce_layer"),
        ({"temperature": None}, TypeError, "temperature"),
        ({"gather_across_devices": 1}, TypeError, "gather_across_devices"),
        ({"return_dict": "yes"}, TypeError, "return_dict"),
        ({"similarity_fct": "cosine"}, TypeError, "similarity_fct"),
    ],
)
def test_invalid_arguments_raise(kwargs, error, match):
    with pytest.raises(error, match=match):
        PearsonSpearmanLoss(None, **kwargs)


def test_half_precision_scores_are_upcast_and_int_labels_accepted():
    scores, labels = random_batch(16, seed=10)
    loss = PearsonSpearmanLoss(None)
    value = loss.compute_loss_from_scores(scores.to(torch.bfloat16), labels.mul(10).round().long())
    assert value.dtype == torch.float32
    expected = reference_total(scores.to(torch.bfloat16).double(), labels.mul(10).round())
    assert torch.allclose(value.double(), expected, atol=1e-4)


def test_gather_without_process_group_is_local():
    scores, labels = random_batch(16, seed=11)
    gathered = PearsonSpearmanLoss(None, gather_across_devices=True).compute_loss_from_scores(scores, labels)
    assert torch.allclose(gathered, PearsonSpearmanLoss(None).compute_loss_from_scores(scores, labels))


def test_config_and_citation():
    config = PearsonSpearmanLoss(None, temperature=0.1).get_config_dict()
    assert config == {
        "pearson_weight": 2.0,
        "rank_kl_weight": 5.0,
        "pro_weight": 0.5,
        "temperature": 0.1,
        "gather_across_devices": False,
        "similarity_fct": "pairwise_cos_sim",
        "mid_nce_weight": 1.0,
        "mid_nce_temperature": 0.02,
        "mid_nce_threshold": 1.0,
        "mid_nce_layer": None,
        "sort_by_length": True,
    }
    assert PearsonSpearmanLoss(None, sort_by_length=False).get_config_dict()["sort_by_length"] is False
    config = PearsonSpearmanLoss(
        None, mid_nce_weight=0.5, mid_nce_temperature=0.1, mid_nce_threshold=4, mid_nce_layer=1
    )
    assert [config.get_config_dict()[key] for key in ("mid_nce_weight", "mid_nce_temperature")] == [0.5, 0.1]
    assert [config.get_config_dict()[key] for key in ("mid_nce_threshold", "mid_nce_layer")] == [4.0, 1]
    assert "2508.11442" in PearsonSpearmanLoss(None).citation


# --- The middle-layer InfoNCE term (MidNCE) against a loop transcription of the official code (float64) ---


def reference_pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Official ``TrainModel.pooling``: mean over the mask, or the last position whose mask is 1."""
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(dim=1) / mask.sum(dim=1, keepdim=True).to(hidden.dtype)
    if mode != "lasttoken":
        raise NotImplementedError(mode)
    rows = []
    for i in range(hidden.shape[0]):
        last = max(j for j in range(mask.shape[1]) if mask[i, j] == 1)
        rows.append(hidden[i, last])
    return torch.stack(rows)


def reference_encode(model, features, layer=None, mode="mean", text_mask=None):
    """Official ``TrainModel.encode_with_multi_layer_loss``: ``hidden_states[n // 2]`` and the last layer, both pooled
    (instruction tokens left out of mean pooling through ``text_mask``) and L2-normalised."""
    inputs = {key: features[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in features}
    outputs = model[0].model(**inputs, output_hidden_states=True)
    n = len(outputs.hidden_states)
    middle = outputs.hidden_states[n // 2 if layer is None else layer]
    mask = text_mask if text_mask is not None and mode == "mean" else features["attention_mask"]
    middle_reps = torch.nn.functional.normalize(reference_pool(middle, mask, mode), dim=-1)
    last_reps = torch.nn.functional.normalize(reference_pool(outputs.last_hidden_state, mask, mode), dim=-1)
    return middle_reps, last_reps


def reference_mid_nce(q: torch.Tensor, p: torch.Tensor, y: torch.Tensor, threshold=1.0, temperature=0.02):
    """Official ``ContrastiveLoss._loss_sts`` (one second sentence per pair) as a loop over the anchors."""
    scores = q @ p.T / temperature
    anchors = [i for i in range(len(y)) if y[i] >= threshold]
    if not anchors:
        return torch.tensor(0.0, dtype=q.dtype, requires_grad=True)
    return sum(-torch.log_softmax(scores[i], dim=0)[i] for i in anchors) / len(anchors)


def reference_four_terms(model, features, labels, layer=None, mode="mean", text_masks=(None, None)):
    """The official STS loss with ``--multi_layer_loss``: (Pearson + rank-KL + PRO terms, MidNCE term)."""
    middle1, last1 = reference_encode(model, features[0], layer, mode, text_masks[0])
    middle2, last2 = reference_encode(model, features[1], layer, mode, text_masks[1])
    return reference_total((last1 * last2).sum(dim=-1), labels), reference_mid_nce(middle1, middle2, labels)


def spy_on_hidden_states(monkeypatch, model) -> list[bool]:
    """Record, per call of the Hugging Face model, whether it was asked for its hidden states.

    sentence-transformers calls the model's bound ``forward`` (module hooks do not fire), so ``forward`` is wrapped.
    """
    hf_model, seen = model[0].model, []
    original = hf_model.forward

    def forward(*args, **kwargs):
        seen.append(bool(kwargs.get("output_hidden_states") or hf_model.config.output_hidden_states))
        return original(*args, **kwargs)

    monkeypatch.setattr(hf_model, "forward", forward)
    return seen


def parameter_grads(model, value: torch.Tensor) -> list[torch.Tensor]:
    model.zero_grad()
    value.backward()
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


S = ENGLISH_SENTENCES
MID_NCE_BATCHES = {
    # (sentence1, sentence2, labels)
    "anchors": (S[:6], S[3:9], [4.0, 0.5, 1.0, 0.0, 2.5, 3.0]),
    "no_anchors": (S[:6], S[3:9], [0.0, 0.5, 0.9, 0.2, 0.7, 0.3]),
    # Tied labels (at the threshold, and above it), repeated first sentences and repeated candidates.
    "ties": (
        [S[0], S[1], S[0], S[2], S[3], S[1]],
        [S[4], S[4], S[5], S[5], S[6], S[7]],
        [1.0, 1.0, 3.0, 3.0, 0.0, 1.0],
    ),
}


def _features(model, sentences1, sentences2, **kwargs):
    return [model.preprocess(sentences1, **kwargs), model.preprocess(sentences2, **kwargs)]


def _check_against_reference(model, loss, batch, layer=None, mode="mean", **preprocess_kwargs):
    sentences1, sentences2, labels = batch
    labels = torch.tensor(labels, dtype=torch.float64)
    terms = loss(_features(model, sentences1, sentences2, **preprocess_kwargs), labels)
    mid_grads = parameter_grads(model, terms["mid_nce_loss"])
    terms = loss(_features(model, sentences1, sentences2, **preprocess_kwargs), labels)
    total_grads = parameter_grads(model, sum(terms.values()))

    features = _features(model, sentences1, sentences2, **preprocess_kwargs)
    other, mid = reference_four_terms(model, features, labels, layer=layer, mode=mode)
    assert torch.allclose(terms["mid_nce_loss"], mid, rtol=0, atol=1e-10), (terms["mid_nce_loss"], mid)
    assert torch.allclose(sum(terms.values()), other + mid, rtol=0, atol=1e-10)
    ref_mid_grads = (
        parameter_grads(model, mid) if mid.grad_fn is not None else [torch.zeros_like(g) for g in mid_grads]
    )
    other, mid = reference_four_terms(model, features, labels, layer=layer, mode=mode)
    ref_total_grads = parameter_grads(model, other + mid)
    for grad, ref_grad in zip(mid_grads, ref_mid_grads):
        assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-10), (grad - ref_grad).abs().max()
    for grad, ref_grad in zip(total_grads, ref_total_grads):
        assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-10), (grad - ref_grad).abs().max()
    return terms, mid_grads


@pytest.mark.parametrize("batch", list(MID_NCE_BATCHES))
def test_mid_nce_matches_official_loop_values_and_gradients(tiny_model, batch):
    model = tiny_model.double()
    terms, mid_grads = _check_against_reference(
        model, PearsonSpearmanLoss(model, return_dict=True), MID_NCE_BATCHES[batch]
    )
    assert list(terms) == ["pearson_loss", "rank_kl_loss", "pro_loss", "mid_nce_loss"]
    largest = max(grad.abs().max() for grad in mid_grads)
    if batch == "no_anchors":
        # 0 with a graph (DDP and the trainer see an ordinary loss), no NaN, no gradient.
        assert terms["mid_nce_loss"].item() == 0.0 and terms["mid_nce_loss"].grad_fn is not None
        assert largest == 0.0
    else:
        # Guards against comparing zeros with zeros.
        assert terms["mid_nce_loss"].item() > 1e-3 and largest > 1e-6


@pytest.mark.parametrize("layer", [0, 2, -1, -3])
def test_mid_nce_layer_override_matches_official_loop(tiny_model, layer):
    model = tiny_model.double()
    loss = PearsonSpearmanLoss(model, return_dict=True, mid_nce_layer=layer)
    _check_against_reference(model, loss, MID_NCE_BATCHES["anchors"], layer=layer)


def test_mid_nce_default_layer_is_half_the_hidden_states_tuple():
    # 3 layers: 4 hidden states (embedding output first), so the default is index 2, not (n - 1) // 2 = 1.
    model = build_tiny_model(seed=1, num_layers=3).double()
    sentences1, sentences2, labels = MID_NCE_BATCHES["anchors"]
    labels = torch.tensor(labels, dtype=torch.float64)
    terms = PearsonSpearmanLoss(model, return_dict=True)(_features(model, sentences1, sentences2), labels)
    features = _features(model, sentences1, sentences2)
    assert torch.allclose(terms["mid_nce_loss"], reference_four_terms(model, features, labels, layer=2)[1], atol=1e-10)
    assert not torch.allclose(
        terms["mid_nce_loss"], reference_four_terms(model, features, labels, layer=1)[1], atol=1e-4
    )


@pytest.mark.parametrize("pooling_mode", ["lasttoken", "mean"])
def test_mid_nce_on_a_tiny_decoder_matches_official_loop(pooling_mode):
    model = build_tiny_decoder(pooling_mode=pooling_mode).double()
    batch = MID_NCE_BATCHES["anchors"]
    assert (model.preprocess(batch[0])["attention_mask"][:, 0] == 0).any()  # left padding is exercised
    terms, _ = _check_against_reference(model, PearsonSpearmanLoss(model, return_dict=True), batch, mode=pooling_mode)
    assert terms["mid_nce_loss"].item() > 1e-3


def test_mid_nce_excludes_prompt_tokens_like_the_final_pooling(tiny_model):
    transformer = tiny_model[0]
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="mean", include_prompt=False)
    model = SentenceTransformer(modules=[transformer, pooling], device="cpu").double()
    sentences1, sentences2, labels = MID_NCE_BATCHES["anchors"]
    labels = torch.tensor(labels, dtype=torch.float64)
    prompt = "retrieval query for "
    features = _features(model, sentences1, sentences2, prompt=prompt)
    prompt_length = int(features[0]["prompt_length"])
    assert prompt_length > 1
    terms = PearsonSpearmanLoss(model, return_dict=True)(features, labels)

    # The official code leaves the instruction out of mean pooling through its text mask (right padding here).
    features = _features(model, sentences1, sentences2, prompt=prompt)
    text_masks = [f["attention_mask"].clone() for f in features]
    for mask in text_masks:
        mask[:, :prompt_length] = 0
    other, mid = reference_four_terms(model, features, labels, text_masks=text_masks)
    assert torch.allclose(terms["mid_nce_loss"], mid, rtol=0, atol=1e-10)
    assert torch.allclose(sum(terms.values()), other + mid, rtol=0, atol=1e-10)
    # Pooling the prompt tokens too gives a different term, so the check above can fail.
    _, mid_with_prompt = reference_four_terms(model, features, labels)
    assert not torch.allclose(mid, mid_with_prompt, atol=1e-4)


def test_mid_nce_weight_zero_is_the_three_term_loss_exactly_and_requests_no_hidden_states(tiny_model, monkeypatch):
    model = tiny_model
    seen = spy_on_hidden_states(monkeypatch, model)
    sentences1, sentences2, labels = MID_NCE_BATCHES["anchors"]
    labels = torch.tensor(labels)

    # sort_by_length=False: one forward per column, as the reference (length-sorted chunks are tested elsewhere).
    loss = PearsonSpearmanLoss(model, mid_nce_weight=0.0, sort_by_length=False)
    value = loss(_features(model, sentences1, sentences2), labels)
    grads = parameter_grads(model, value)
    assert seen == [False, False]
    # Today's three-term loss: one forward per column, cosine, the three terms.
    embeddings = [model(f)["sentence_embedding"] for f in _features(model, sentences1, sentences2)]
    expected = PearsonSpearmanLoss(None).compute_loss_from_scores(util.pairwise_cos_sim(*embeddings), labels)
    assert torch.equal(value, expected)
    for grad, expected_grad in zip(grads, parameter_grads(model, expected)):
        assert torch.equal(grad, expected_grad)
    assert list(
        PearsonSpearmanLoss(model, mid_nce_weight=0.0, return_dict=True)(
            _features(model, *MID_NCE_BATCHES["anchors"][:2]), labels
        )
    ) == ["pearson_loss", "rank_kl_loss", "pro_loss"]

    # With the term on, the other three terms are unchanged, bit for bit.
    seen.clear()
    on = PearsonSpearmanLoss(model, return_dict=True)(_features(model, sentences1, sentences2), labels)
    off = PearsonSpearmanLoss(model, return_dict=True, mid_nce_weight=0.0)(
        _features(model, sentences1, sentences2), labels
    )
    assert seen == [True, True, False, False]
    for name in off:
        assert torch.equal(on[name], off[name])
    assert on["mid_nce_loss"] > 0


def test_hidden_states_are_requested_for_the_loss_forward_only(tiny_model, monkeypatch):
    model = tiny_model
    hf_model = model[0].model
    seen = spy_on_hidden_states(monkeypatch, model)
    sentences1, sentences2, labels = MID_NCE_BATCHES["anchors"]
    labels = torch.tensor(labels)
    before = model.encode(sentences1, convert_to_tensor=True)
    assert seen and not any(seen)

    seen.clear()
    features = _features(model, sentences1, sentences2)
    PearsonSpearmanLoss(model)(features, labels).backward()
    assert seen == [True, True]
    assert hf_model.config.output_hidden_states is False

    # model.encode and another loss on the same model get no hidden states.
    seen.clear()
    assert torch.equal(model.encode(sentences1, convert_to_tensor=True), before)
    other_features = _features(model, sentences1, sentences2)
    CoSENTLoss(model)(other_features, labels)
    assert seen and not any(seen)
    assert not any("all_layer_embeddings" in f for f in other_features)

    # An error inside the loss's forward still switches the flag back.
    def fail(*args, **kwargs):
        raise RuntimeError("forward failed")

    with monkeypatch.context() as patch:
        patch.setattr(hf_model, "forward", fail)
        with pytest.raises(RuntimeError, match="forward failed"):
            PearsonSpearmanLoss(model)(_features(model, sentences1, sentences2), labels)
    assert hf_model.config.output_hidden_states is False

    # A model configured to return hidden states keeps that setting.
    hf_model.config.output_hidden_states = True
    PearsonSpearmanLoss(model)(_features(model, sentences1, sentences2), labels)
    assert hf_model.config.output_hidden_states is True


@pytest.mark.parametrize("wrapper", ["matryoshka", "adaptive_layer"])
def test_four_term_loss_inside_sentence_transformers_wrappers(tiny_model, wrapper):
    # Both wrappers cache the model's output dict and read it again, `all_layer_embeddings` included.
    inner = PearsonSpearmanLoss(tiny_model)
    if wrapper == "matryoshka":
        loss = MatryoshkaLoss(tiny_model, inner, matryoshka_dims=[32, 16])
    else:
        loss = AdaptiveLayerLoss(tiny_model, inner)
    sentences1, sentences2, labels = MID_NCE_BATCHES["anchors"]
    value = loss(_features(tiny_model, sentences1, sentences2), torch.tensor(labels))
    grads = parameter_grads(tiny_model, value)
    assert torch.isfinite(value) and all(torch.isfinite(grad).all() for grad in grads)
    assert tiny_model[0].model.config.output_hidden_states is False


def test_mid_nce_layer_out_of_range_raises_naming_the_argument(tiny_model):
    # 2 layers: 3 hidden states, indices -3..2.
    for layer in (3, -4):
        with pytest.raises(ValueError, match="`mid_nce_layer`=.*out of range"):
            PearsonSpearmanLoss(tiny_model, mid_nce_layer=layer)
    PearsonSpearmanLoss(tiny_model, mid_nce_layer=7, mid_nce_weight=0.0)  # unused when the term is off
    # Checked again at run time, where the number of hidden states is known for sure.
    loss = PearsonSpearmanLoss(None, mid_nce_layer=7)
    loss.model = tiny_model
    with pytest.raises(ValueError, match="`mid_nce_layer`=7 is out of range.*3 hidden states"):
        loss(_features(tiny_model, *MID_NCE_BATCHES["anchors"][:2]), torch.tensor(MID_NCE_BATCHES["anchors"][2]))
    assert tiny_model[0].model.config.output_hidden_states is False


def test_models_without_hidden_states_raise_naming_the_argument(tiny_model, monkeypatch):
    static = SentenceTransformer(modules=[StaticEmbedding(build_tokenizer(), embedding_dim=8)], device="cpu")
    with pytest.raises(ValueError, match="`mid_nce_weight` > 0 needs the hidden states of a .*Transformer"):
        PearsonSpearmanLoss(static)
    PearsonSpearmanLoss(static, mid_nce_weight=0.0)
    without_pooling = SentenceTransformer(modules=[tiny_model[0]], device="cpu")
    with pytest.raises(ValueError, match="`mid_nce_weight` > 0 .* no Pooling"):
        PearsonSpearmanLoss(without_pooling)

    # A Transformer whose model drops its hidden states: found at run time.
    loss = PearsonSpearmanLoss(tiny_model)
    hf_model = tiny_model[0].model
    original = hf_model.forward
    monkeypatch.setattr(
        hf_model, "forward", lambda *args, **kwargs: BaseModelOutput(last_hidden_state=original(*args, **kwargs)[0])
    )
    with pytest.raises(ValueError, match="`mid_nce_weight` > 0 needs hidden states.*returned none"):
        loss(_features(tiny_model, *MID_NCE_BATCHES["anchors"][:2]), torch.tensor(MID_NCE_BATCHES["anchors"][2]))
    assert tiny_model[0].model.config.output_hidden_states is False


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("threshold", [-1.0, 1.0, 2.5, 9.0])
def test_mid_nce_loss_function_matches_loop(seed, threshold):
    generator = torch.Generator().manual_seed(seed)
    first = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    second = torch.randn(9, 5, generator=generator, dtype=torch.float64)
    second[4] = second[2]  # tied candidates
    labels = torch.randint(0, 4, (9,), generator=generator).double()
    temperature = 0.02 * (seed + 1)

    def ours(a, b):
        return mid_nce_loss(a, b, labels, temperature, threshold)

    def reference(a, b):
        a, b = torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1)
        return reference_mid_nce(a, b, labels, threshold, temperature)

    inputs = (first.clone().requires_grad_(True), second.clone().requires_grad_(True))
    value = ours(*inputs)
    grads = torch.autograd.grad(value, inputs)
    ref_inputs = (first.clone().requires_grad_(True), second.clone().requires_grad_(True))
    ref_value = reference(*ref_inputs)
    assert torch.allclose(value, ref_value, rtol=0, atol=1e-10)
    assert torch.isfinite(value) and value.grad_fn is not None
    if threshold > 3.0:  # no anchor
        assert value.item() == 0.0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)
    else:
        ref_grads = torch.autograd.grad(ref_value, ref_inputs)
        for grad, ref_grad in zip(grads, ref_grads):
            assert torch.allclose(grad, ref_grad, rtol=0, atol=1e-10)
        assert value.item() > 1e-3


def test_mid_nce_loss_function_rejects_bad_shapes():
    with pytest.raises(ValueError, match="same shape"):
        mid_nce_loss(torch.rand(3, 4), torch.rand(3, 5), torch.rand(3), 0.02, 1.0)
    with pytest.raises(ValueError, match="length batch_size"):
        mid_nce_loss(torch.rand(3, 4), torch.rand(3, 4), torch.rand(4), 0.02, 1.0)


def test_only_mid_nce_without_middle_embeddings_raises():
    loss = PearsonSpearmanLoss(None, pearson_weight=0.0, rank_kl_weight=0.0, pro_weight=0.0)
    scores, labels = random_batch(6, seed=12)
    with pytest.raises(ValueError, match="only the middle-layer term"):
        loss.compute_loss_from_scores(scores, labels)
    middle = [torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)]
    value = loss.compute_loss_from_scores(scores, labels, middle_embeddings=middle)
    expected = mid_nce_loss(*middle, labels, 0.02, 1.0)
    assert torch.equal(value, expected)


# --- Distributed: 2 gloo ranks with gathering == one process on the full batch ---


@pytest.mark.distributed
def test_two_rank_gathered_gradients_equal_single_process(loss_rank_runs):
    folder = job_output(loss_rank_runs, "pearson_spearman")  # dist_pearson_spearman_worker.py's outputs
    results = [json.loads(path.read_text()) for path in sorted(folder.glob("rank*.json"))]
    assert [result["rank"] for result in results] == [0, 1]
    for result in results:
        assert result["terms"] == ["mid_nce_loss", "pearson_loss", "pro_loss", "rank_kl_loss"]
        assert result["mid_nce_loss"] == pytest.approx(result["reference_mid_nce_loss"], abs=1e-12)
        assert result["reference_mid_nce_loss"] > 1e-3
        assert result["local_term_diff"] < 1e-10 and result["local_vs_global_mid_nce"] > 1e-6
        assert result["max_term_diff"] < 1e-10
        assert result["max_grad_diff"] < 1e-10 and result["max_grad"] > 1e-6
        assert (
            result["rank_losses"][0] == result["rank_losses"][1] == pytest.approx(result["reference_loss"], abs=1e-12)
        )


# --- Inside SentenceTransformerTrainer ---


TRAIN_SENTENCES = ENGLISH_SENTENCES


def _sts_pairs(n: int = 24) -> Dataset:
    """Pairs of two different sentences with arbitrary graded scores: only training can fit their order."""
    generator = torch.Generator().manual_seed(0)
    rows = {"sentence1": [], "sentence2": [], "score": []}
    for i in range(n):
        first, second = i % len(TRAIN_SENTENCES), (i * 3 + 1 + i // len(TRAIN_SENTENCES)) % len(TRAIN_SENTENCES)
        rows["sentence1"].append(TRAIN_SENTENCES[first])
        rows["sentence2"].append(TRAIN_SENTENCES[second])
        rows["score"].append(float(torch.randint(0, 6, (1,), generator=generator)))
    return Dataset.from_dict(rows)


def _spearman(model, dataset: Dataset) -> float:
    embeddings1 = model.encode(dataset["sentence1"], convert_to_tensor=True)
    embeddings2 = model.encode(dataset["sentence2"], convert_to_tensor=True)
    return spearmanr(util.pairwise_cos_sim(embeddings1, embeddings2).numpy(), dataset["score"]).statistic


def _args(tmp_path, **kwargs) -> SentenceTransformerTrainingArguments:
    return SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=12,
        learning_rate=3e-3,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        use_cpu=True,
        **kwargs,
    )


def test_trainer_steps_raise_spearman_on_training_pairs(tiny_model, tmp_path):
    dataset = _sts_pairs()
    before = _spearman(tiny_model, dataset)
    trainer = SentenceTransformerTrainer(
        model=tiny_model,
        args=_args(tmp_path, max_steps=16),
        train_dataset=dataset,
        loss=PearsonSpearmanLoss(tiny_model),
    )
    trainer.train()
    after = _spearman(tiny_model, dataset)
    assert after > before + 0.3, (before, after)

    # The model card records the loss through get_config_dict and citation.
    tiny_model.save(str(tmp_path / "trained"))
    card = (tmp_path / "trained" / "README.md").read_text()
    assert "PearsonSpearmanLoss" in card and '"rank_kl_weight": 5.0' in card and "zhang2025codiemb" in card


def test_trainer_with_loss_dict_logs_each_term(tiny_model, tmp_path):
    dataset = DatasetDict({"sts": _sts_pairs(), "sts_binary": _sts_pairs().map(lambda r: {"score": r["score"] > 2})})
    loss = {
        "sts": PearsonSpearmanLoss(tiny_model, return_dict=True),
        "sts_binary": PearsonSpearmanLoss(tiny_model, return_dict=True),
    }
    trainer = SentenceTransformerTrainer(
        model=tiny_model, args=_args(tmp_path, max_steps=4, logging_steps=1), train_dataset=dataset, loss=loss
    )
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged
    for entry in logged:
        terms = [entry["pearson_loss"], entry["rank_kl_loss"], entry["pro_loss"], entry["mid_nce_loss"]]
        assert all(term == term and term >= 0 for term in terms)  # finite numbers, no NaN
        assert entry["loss"] == pytest.approx(sum(terms), abs=2e-3)  # the trainer logs their sum (rounded to 4 d.p.)


def test_trainer_with_the_four_term_loss_lowers_the_training_loss(tiny_model, tmp_path):
    dataset = _sts_pairs()
    loss = PearsonSpearmanLoss(tiny_model, return_dict=True)

    def full_batch_terms() -> dict[str, float]:
        features = [tiny_model.preprocess(dataset["sentence1"]), tiny_model.preprocess(dataset["sentence2"])]
        with torch.no_grad():
            terms = loss(features, torch.tensor(dataset["score"]))
        return {name: value.item() for name, value in terms.items()}

    before = full_batch_terms()
    trainer = SentenceTransformerTrainer(
        model=tiny_model, args=_args(tmp_path, max_steps=16, logging_steps=4), train_dataset=dataset, loss=loss
    )
    trainer.train()
    after = full_batch_terms()
    assert sum(after.values()) < sum(before.values()) - 0.1, (before, after)
    assert after["mid_nce_loss"] < before["mid_nce_loss"], (before, after)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged and all(entry["mid_nce_loss"] > 0 for entry in logged)
    assert tiny_model[0].model.config.output_hidden_states is False
