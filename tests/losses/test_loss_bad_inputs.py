"""Bad inputs to the losses (and the column rule of num_positives): the right exception naming the culprit, or the
documented zero-loss fallback with a warning.

Part of the bad-input tables (shared pieces: tests/bad_input_cases.py; the count: tests/test_bad_input_count.py).
"""

from __future__ import annotations

import inspect
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from bad_input_cases import (
    Case,
    Env,
    features,
    pairs,
    run_case,
)
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import AdaptiveLayerLoss
from tiny_model import build_tiny_model

from codiemb_st import (
    MultiPositiveCachedInfoNCELoss,
    PearsonSpearmanLoss,
    ir_dataset_from_records,
)


def _adaptive_layer_ir(env: Env) -> Any:
    inner = MultiPositiveCachedInfoNCELoss(env.model)
    with pytest.warns(UserWarning, match="not compatible"):  # sentence-transformers' own (vague) warning
        wrapper = AdaptiveLayerLoss(env.model, inner)
    return wrapper(pairs(env.model), None)


# Every term weight of the STS loss (the set of terms grows, e.g. with a middle-layer term).
_STS_WEIGHTS = [
    name for name in inspect.signature(PearsonSpearmanLoss.__init__).parameters if name.endswith("_weight")
]


def _triples(model) -> list[dict[str, torch.Tensor]]:
    """Two rows of (anchor, positive, negative): P + N = 2 candidate columns."""
    return [features(model, texts) for texts in (["q one", "q two"], ["a one", "a two"], ["n one", "n two"])]


def _distilling(model, **kwargs) -> MultiPositiveCachedInfoNCELoss:
    return MultiPositiveCachedInfoNCELoss(model, distillation_weight=1.0, **kwargs)


def _guided(model) -> MultiPositiveCachedInfoNCELoss:
    return MultiPositiveCachedInfoNCELoss(model, guide=model)


def _three_embeddings(rows: int = 2, dim: int = 32) -> list[torch.Tensor]:
    return [torch.randn(rows, dim) for _ in range(3)]


LOSS_CASES = [
    Case(
        "ir-num-positives-0",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, num_positives=0),
        ValueError,
        "num_positives",
    ),
    Case(
        "ir-temperature-1e-39-overflows",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature=1e-39),
        ValueError,
        r"`temperature`=1e-39 .*1/temperature .*overflows float32",
    ),
    Case(
        "ir-temperature-denormal",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature=5e-324),
        ValueError,
        r"`temperature`=5e-324 .*overflows",
    ),
    Case(
        "ir-temperature-nan",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature=float("nan")),
        ValueError,
        "temperature",
    ),
    Case(
        "ir-temperature-string",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, temperature="0.02"),
        TypeError,
        "`temperature` must be a number",
    ),
    Case(  # one rule everywhere (codiemb_st.validation): wrong type -> TypeError, as the data loader raises
        "ir-num-positives-string",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, num_positives="2"),
        TypeError,
        "`num_positives` must be an integer",
    ),
    Case(
        "ir-model-name-not-model",
        lambda e: MultiPositiveCachedInfoNCELoss("all-MiniLM-L6-v2"),
        TypeError,
        r"`model` must be a SentenceTransformer; got str\. Load it first",
    ),
    Case(
        "ir-mini-batch-size-0",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, mini_batch_size=0),
        ValueError,
        "mini_batch_size",
    ),
    Case(
        "ir-objective-unknown",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, objective="both"),
        ValueError,
        "objective",
    ),
    Case(
        "ir-too-few-columns",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, num_positives=2)(pairs(e.model), None),
        ValueError,
        r"num_positives=2\) needs at least 3 text columns.*has 2",
    ),
    Case(
        "ir-inside-adaptive-layer-loss",
        _adaptive_layer_ir,
        TypeError,
        "AdaptiveLayerLoss cannot wrap MultiPositiveCachedInfoNCELoss: .*GradCache.*MatryoshkaLoss",
    ),
    # Teacher scores (distillation): the labels of an IR batch, one per candidate column.
    Case(
        "ir-distill-no-labels",
        lambda e: _distilling(e.model)(_triples(e.model), None),
        ValueError,
        r"needs teacher scores as labels: a dataset column 'label' holding a list of 2 floats.*has no labels",
    ),
    Case(
        "ir-distill-labels-wrong-columns",
        lambda e: _distilling(e.model)(_triples(e.model), torch.rand(2, 3)),
        ValueError,
        r"shape \(batch, P \+ N\) = \(2, 2\).*positive_1, negative_1.*got shape \(2, 3\)",
    ),
    Case(
        "ir-distill-labels-one-per-row",
        lambda e: _distilling(e.model)(_triples(e.model), torch.rand(2)),
        ValueError,
        r"got shape \(2,\)\. A 1-D label column holds one score per row",
    ),
    Case(
        "ir-distill-labels-nan",
        lambda e: _distilling(e.model)(_triples(e.model), torch.tensor([[1.0, 0.0], [float("nan"), 2.0]])),
        ValueError,
        r"NaN or infinite values \(first at row 1, column 0 of 2",
    ),
    Case(
        "ir-distill-labels-strings",
        lambda e: _distilling(e.model)(_triples(e.model), [["0.9", "0.1"], ["0.8", "0.2"]]),
        TypeError,
        r"teacher scores \(labels\) must be a float tensor.*got list",
    ),
    Case(
        "ir-distill-one-candidate-column",
        lambda e: _distilling(e.model)(pairs(e.model), torch.rand(2, 1)),
        ValueError,
        r"needs at least 2 candidate columns.*has 1",
    ),
    Case(
        "ir-distill-weight-negative",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, distillation_weight=-1.0),
        ValueError,
        r"`distillation_weight` must be >= 0",
    ),
    Case(
        "ir-distill-teacher-temperature-zero",
        lambda e: _distilling(e.model, teacher_temperature=0.0),
        ValueError,
        r"`teacher_temperature` must be > 0",
    ),
    # The guide model (false-negative masking).
    Case(
        "ir-guide-name-not-model",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, guide="BAAI/bge-small-en-v1.5"),
        TypeError,
        r"`guide` must be a SentenceTransformer; got str\. Load it first",
    ),
    Case(
        "ir-guide-plain-module",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, guide=torch.nn.Linear(4, 4)),
        TypeError,
        r"`guide` must be a SentenceTransformer; got Linear",
    ),
    Case(
        "ir-guide-margin-strategy-unknown",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, guide=e.model, margin_strategy="percent"),
        ValueError,
        r"`margin_strategy` must be one of 'absolute', 'relative'; got 'percent'",
    ),
    Case(
        "ir-guide-margin-nan",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, guide=e.model, margin=float("nan")),
        ValueError,
        r"`margin` must be a finite number",
    ),
    Case(
        "ir-guide-embeddings-missing-columns",
        lambda e: _guided(e.model).compute_loss_from_embeddings(
            _three_embeddings(), guide_embeddings=_three_embeddings()[:2]
        ),
        ValueError,
        r"one guide embedding tensor per column \(3 columns.*got 2",
    ),
    Case(
        "ir-guide-embeddings-wrong-rows",
        lambda e: _guided(e.model).compute_loss_from_embeddings(
            _three_embeddings(), guide_embeddings=_three_embeddings(rows=3, dim=8)
        ),
        ValueError,
        r"guide embeddings of column 0 must have shape \(batch, guide_dim\) with batch = 2; got \(3, 8\)",
    ),
    Case(
        "ir-guide-embeddings-nan",
        lambda e: _guided(e.model).compute_loss_from_embeddings(
            _three_embeddings(), guide_embeddings=[*_three_embeddings()[:2], torch.full((2, 8), float("nan"))]
        ),
        ValueError,
        r"guide's embeddings of column 2 contain NaN or infinite values",
    ),
    # directions, partition_mode, hardness (sentence-transformers 6.x's InfoNCE options).
    Case(
        "ir-directions-unknown",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, directions=("query_to_doc", "doc_to_passage")),
        ValueError,
        r"`directions` must be a non-empty subset of .*unknown: \['doc_to_passage'\]",
    ),
    Case(
        "ir-directions-a-string",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, directions="query_to_doc"),
        TypeError,
        r"`directions` must be a tuple of direction names",
    ),
    Case(
        "ir-directions-without-query-to-doc",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, directions=("doc_to_query",)),
        ValueError,
        r"must include 'query_to_doc'",
    ),
    Case(
        "ir-per-direction-with-doc-to-doc",
        lambda e: MultiPositiveCachedInfoNCELoss(
            e.model, directions=("query_to_doc", "doc_to_doc"), partition_mode="per_direction"
        ),
        ValueError,
        r"partition_mode='per_direction' needs every direction's candidates to include the positive",
    ),
    Case(
        "ir-directions-with-joint-objective",
        lambda e: MultiPositiveCachedInfoNCELoss(
            e.model, num_positives=2, objective="joint", directions=("query_to_doc", "doc_to_query")
        ),
        ValueError,
        r"`directions` \('doc_to_query',\) need objective='per_slot'",
    ),
    Case(
        "ir-directions-without-in-batch-negatives",
        lambda e: MultiPositiveCachedInfoNCELoss(
            e.model, in_batch_negatives=False, directions=("query_to_doc", "query_to_query")
        ),
        ValueError,
        r"in_batch_negatives=False removes",
    ),
    Case(
        "ir-hardness-mode-unknown",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, hardness_mode="hardest", hardness_strength=5.0),
        ValueError,
        r"`hardness_mode` must be one of None, 'in_batch_negatives'",
    ),
    Case(
        "ir-hardness-strength-negative",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, hardness_mode="hard_negatives", hardness_strength=-5.0),
        ValueError,
        r"`hardness_strength` must be >= 0",
    ),
    Case(
        "ir-hardness-strength-nan",
        lambda e: MultiPositiveCachedInfoNCELoss(
            e.model, hardness_mode="hard_negatives", hardness_strength=float("nan")
        ),
        ValueError,
        r"`hardness_strength` must be a finite number",
    ),
    Case(
        "ir-partition-mode-unknown",
        lambda e: MultiPositiveCachedInfoNCELoss(e.model, partition_mode="separate"),
        ValueError,
        r"`partition_mode` must be one of 'joint', 'per_direction'",
    ),
    Case(
        "sts-temperature-1e-39-overflows",
        lambda e: PearsonSpearmanLoss(e.model, temperature=1e-39),
        ValueError,
        r"`temperature`=1e-39 .*overflows float32",
    ),
    Case(
        "sts-mid-nce-temperature-overflows",
        lambda e: PearsonSpearmanLoss(e.model, mid_nce_temperature=1e-40),
        ValueError,
        r"`mid_nce_temperature`=1e-40 .*overflows float32",
    ),
    Case(
        "sts-temperature-inf",
        lambda e: PearsonSpearmanLoss(e.model, temperature=float("inf")),
        ValueError,
        "`temperature` must be a finite number",
    ),
    Case(
        "sts-weight-string",
        lambda e: PearsonSpearmanLoss(e.model, pearson_weight="2"),
        TypeError,
        "`pearson_weight` must be a number",
    ),
    Case(
        "sts-all-weights-zero",
        lambda e: PearsonSpearmanLoss(e.model, **dict.fromkeys(_STS_WEIGHTS, 0)),
        ValueError,
        "At least one of",
    ),
    Case(
        "sts-string-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), ["4.5", "1.0"]),
        TypeError,
        r"`labels` \(the dataset's 'score' column\) .*got list of str\. Convert the string scores",
    ),
    Case(
        "sts-string-labels-from-scores",
        lambda e: PearsonSpearmanLoss(e.model).compute_loss_from_scores(torch.rand(2), ["a", "b"]),
        TypeError,
        r"`labels`.*list of str",
    ),
    Case(
        "sts-list-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), [4.5, 1.0]),
        TypeError,
        r"`labels`.*got list of float\. Pass torch\.tensor",
    ),
    Case(
        "sts-bool-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), torch.tensor([True, False])),
        TypeError,
        r"`labels`.*real numbers; got dtype torch\.bool",
    ),
    Case(
        "sts-no-labels", lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), None), ValueError, "no labels.*'score'"
    ),
    Case(
        "sts-nan-labels",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), torch.tensor([1.0, float("nan")])),
        ValueError,
        "NaN or infinite gold scores",
    ),
    Case(
        "sts-three-columns",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model) + pairs(e.model)[:1], torch.rand(2)),
        ValueError,
        "exactly 2 text columns.*got 3",
    ),
    Case(
        "sts-label-count",
        lambda e: PearsonSpearmanLoss(e.model)(pairs(e.model), torch.rand(3)),
        ValueError,
        "expects 2 labels.*got 3",
    ),
]


def _empty(model) -> dict[str, torch.Tensor]:
    return {k: v[:0] if isinstance(v, torch.Tensor) else v for k, v in features(model, ["x"]).items()}


def _assert_zero_step(loss: torch.Tensor, model) -> None:
    assert loss.item() == 0.0
    model.zero_grad()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.count_nonzero(g) == 0 for g in grads)


FALLBACK_CASES = [
    "ir-empty-batch",
    "ir-empty-embeddings",
    "ir-one-query-no-negatives",
    "sts-empty-batch",
    "sts-empty-batch-dict",
    "sts-one-pair",
    "sts-empty-batch-mid-nce-only",
]


@pytest.mark.parametrize("case", FALLBACK_CASES)
def test_batches_too_small_for_a_loss_give_zero_and_a_warning(case, model, caplog):
    """Documented fallback, not an error: a short last batch is normal without dataloader_drop_last=True."""
    caplog.set_level(logging.WARNING)
    if case == "ir-empty-batch":
        loss = MultiPositiveCachedInfoNCELoss(model)([_empty(model), _empty(model)], None)
        expected = r"empty batch \(0 queries\)"
    elif case == "ir-empty-embeddings":
        embeddings = [torch.zeros(0, 32, requires_grad=True), torch.zeros(0, 32, requires_grad=True)]
        loss = MultiPositiveCachedInfoNCELoss(model).compute_loss_from_embeddings(embeddings)
        expected = r"empty batch \(0 queries\)"
    elif case == "ir-one-query-no-negatives":
        loss = MultiPositiveCachedInfoNCELoss(model)([features(model, ["a query"]), features(model, ["a doc"])])
        expected = r"1 query and no hard negatives.*exactly 0.*dataloader_drop_last=True"
    elif case == "sts-empty-batch":
        loss = PearsonSpearmanLoss(model)([_empty(model), _empty(model)], torch.zeros(0))
        expected = r"batch of 0 pair\(s\).*contributes 0"
    elif case == "sts-empty-batch-dict":
        terms = PearsonSpearmanLoss(model, return_dict=True)([_empty(model), _empty(model)], torch.zeros(0))
        # The same four keys as every other step (the trainer logs each term).
        assert set(terms) == {"pearson_loss", "rank_kl_loss", "pro_loss", "mid_nce_loss"}
        loss = sum(terms.values())
        expected = r"batch of 0 pair\(s\)"
    elif case == "sts-empty-batch-mid-nce-only":
        only_mid = PearsonSpearmanLoss(model, pearson_weight=0, rank_kl_weight=0, pro_weight=0)
        loss = only_mid([_empty(model), _empty(model)], torch.zeros(0))
        expected = r"batch of 0 pair\(s\)"
    else:
        loss = PearsonSpearmanLoss(model)([features(model, ["a"]), features(model, ["b"])], torch.tensor([1.0]))
        expected = r"batch of 1 pair\(s\)"
    _assert_zero_step(loss, model)
    assert re.search(expected, caplog.text), caplog.text


def test_a_one_query_batch_with_hard_negatives_is_not_flagged(model, caplog):
    caplog.set_level(logging.WARNING)
    loss = MultiPositiveCachedInfoNCELoss(model)([features(model, [t]) for t in ("query", "doc", "negative")])
    assert loss.item() > 0 and "no hard negatives" not in caplog.text


def _one_step_trainer(model, dataset, loss, tmp: Path) -> SentenceTransformerTrainer:
    from codiemb_st import LossColumnCheck

    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp / "run"), max_steps=1, per_device_train_batch_size=4, report_to="none", save_strategy="no"
    )
    return SentenceTransformerTrainer(
        model=model, args=args, train_dataset=dataset, loss=loss, callbacks=[LossColumnCheck(loss)]
    )


def _multi_positive_rows(n: int = 8) -> Dataset:
    return Dataset.from_dict(
        {
            "anchor": [f"query {i}" for i in range(n)],
            "positive_1": [f"first answer {i}" for i in range(n)],
            "positive_2": [f"second answer {i}" for i in range(n)],
            "negative_1": [f"unrelated text {i}" for i in range(n)],
        }
    )


def test_loss_refuses_a_second_positive_column_before_its_first_step(tmp_path):
    model = build_tiny_model(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=4)
    trainer = _one_step_trainer(model, _multi_positive_rows(), loss, tmp_path)
    expected = r"num_positives=1 does not fit .*'positive_2'.*positive_2 would be trained as hard negative.*=2"
    with pytest.raises(ValueError, match=expected):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_loss_whose_num_positives_fits_the_columns_trains(tmp_path):
    model = build_tiny_model(seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    loss = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=4)
    trainer = _one_step_trainer(model, _multi_positive_rows(), loss, tmp_path)
    trainer.train()
    assert trainer.state.global_step == 1
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_column_check_finds_the_loss_of_each_named_dataset(tmp_path):
    model = build_tiny_model(seed=0)
    fits = MultiPositiveCachedInfoNCELoss(model, num_positives=2, mini_batch_size=4)
    too_few = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=4)
    data = DatasetDict({"good": _multi_positive_rows(), "bad": _multi_positive_rows()})
    trainer = _one_step_trainer(model, data, {"good": fits, "bad": too_few}, tmp_path)
    with pytest.raises(ValueError, match=r"training dataset 'bad'.*num_positives=1"):
        trainer.train()


@pytest.mark.parametrize(
    ("columns", "num_positives", "match"),
    [
        (["anchor", "positive", "negative"], 2, r"negative would be trained as positive"),
        (["anchor", "positive_1"], 2, r"needs at least 3 text columns"),
        (
            ["anchor", "negative_1", "positive_1"],
            1,
            r"negative_1 would be trained as positive.*right after the anchor",
        ),
    ],
)
def test_column_rule_names_columns_and_num_positives(columns, num_positives, match):
    from codiemb_st.losses.column_check import check_ir_columns

    with pytest.raises(ValueError, match=match):
        check_ir_columns(columns, num_positives)
    check_ir_columns(["anchor", "positive_1", "positive_2", "negative_1", "label"], 2)
    check_ir_columns(["question", "answer", "other"], 1)  # names it does not judge pass


def test_recipe_takes_num_positives_from_the_data(tmp_path):
    from codiemb_st import recipe

    model = build_tiny_model(seed=0)
    records = [{"query": f"q{i}", "positives": [f"a{i}", f"b{i}"], "negatives": [f"n{i}"]} for i in range(4)]
    data = recipe.load_task_datasets(ir={"two": records}, num_positives=2)
    assert (data.num_positives("two"), data.num_negatives("two")) == (2, 1)
    data.datasets["one"] = ir_dataset_from_records(records, num_positives=1, num_negatives=0)  # swapped in by hand
    data.ir.append("one")
    losses = recipe.build_task_losses(model, data, mini_batch_size=4)
    assert losses["two"].num_positives == 2 and losses["one"].num_positives == 1
    with pytest.raises(TypeError, match="takes num_positives from the datasets"):
        recipe.build_task_losses(model, data, num_positives=1)
    data.datasets["odd"] = Dataset.from_dict({"anchor": ["x"], "positive": ["y"]})
    data.ir.append("odd")
    with pytest.raises(ValueError, match=r"IR dataset 'odd' has columns \['anchor', 'positive'\]"):
        recipe.build_task_losses(model, data)


@pytest.mark.parametrize("case", LOSS_CASES, ids=[f"losses:{case.id}" for case in LOSS_CASES])
def test_bad_input_gets_a_clear_answer(case, env):
    run_case(case, env)
