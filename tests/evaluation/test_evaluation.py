from __future__ import annotations

import importlib
import importlib.util
import math
from pathlib import Path

import mteb
import pytest
from datasets import Dataset
from evaluation_fixtures import (
    CORPUS,
    QRELS,
    STS_PAIRS,
    reference_ndcg_at_10,
    reference_sts_spearman,
    write_retrieval_task,
    write_sts_task,
    write_tiny_tasks,
)
from mteb.abstasks import AbsTaskRetrieval, AbsTaskSTS
from tiny_model import build_tiny_model

from codiemb_st.evaluation import (
    CMTEB_TASKS,
    LocalTaskInfo,
    MTEBEvaluator,
    evaluate_model,
    instruction_prompts,
    load_local_task,
    prepare_task,
    prepare_tasks,
    subsample_corpus,
    summarize_scores,
)

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_tasks(tmp_path_factory.mktemp("eval_data"))


@pytest.fixture(scope="module")
def models():
    """Two different tiny models (the cache trap needs two)."""
    return build_tiny_model(seed=0), build_tiny_model(seed=1)


# --------------------------------------------------------------------------------------------------- task list


def test_cmteb_task_list_matches_mteb_metadata():
    assert len(CMTEB_TASKS) == 15
    assert sum(spec.type == "retrieval" for spec in CMTEB_TASKS) == 8
    for spec in CMTEB_TASKS:
        task = mteb.get_task(spec.name)
        assert spec.split in task.metadata.eval_splits, spec.name
        assert spec.main_score == task.metadata.main_score, spec.name
        assert {"retrieval": "Retrieval", "sts": "STS"}[spec.type] == task.metadata.type
        assert spec.instruction and spec.instruction_en


def test_instruction_prompts_use_mteb_keys_and_official_format():
    prompts = instruction_prompts()
    assert len(prompts) == 15
    # METHOD.md's two quoted examples, in the official "Instruction: ... Query: " prefix.
    assert prompts["ATEC"] == "Instruction: 为金融领域客服场景的句子生成表示 Query: "
    assert prompts["T2Retrieval-query"] == "Instruction: 为通用领域问题生成表示，用于匹配相关文本 Query: "
    assert "T2Retrieval" not in prompts and "T2Retrieval-document" not in prompts  # passages get none
    english = instruction_prompts(["BQ", "SciFact"], language="en")
    assert list(english) == ["BQ"]
    assert english["BQ"].startswith("Instruction: Represent the user problem descriptions")
    with pytest.raises(ValueError, match="language"):
        instruction_prompts(language="fr")
    with pytest.raises(ValueError, match="template"):
        instruction_prompts(template="no placeholder")


# --------------------------------------------------------------------------------------------------- local data


def test_local_tasks_use_real_classes_for_known_names_and_generic_otherwise(data_dir):
    sts = load_local_task(data_dir / "STSBenchmark")
    assert type(sts) is type(mteb.get_task("STSBenchmark"))
    retrieval = load_local_task(data_dir / "SciFact")
    assert type(retrieval) is type(mteb.get_task("SciFact"))
    generic_sts = load_local_task(data_dir / "TinySTS")
    generic_ret = load_local_task(data_dir / "TinyRetrieval")
    assert isinstance(generic_sts, AbsTaskSTS) and generic_sts.metadata.name == "TinySTS"
    assert isinstance(generic_ret, AbsTaskRetrieval) and generic_ret.metadata.name == "TinyRetrieval"
    assert (generic_sts.min_score, generic_sts.max_score) == (0, 5)
    for task in (sts, retrieval, generic_sts, generic_ret):
        assert task.data_loaded and list(task.eval_splits) == ["test"]

    pairs = sts.dataset["default"]["test"]
    assert pairs.column_names == ["sentence1", "sentence2", "score"] and len(pairs) == len(STS_PAIRS)
    split = retrieval.dataset["default"]["test"]
    assert split["relevant_docs"] == QRELS and split["top_ranked"] is None
    assert sorted(split["queries"]["id"]) == sorted(QRELS)  # the unjudged query is dropped
    assert split["corpus"]["id"] == list(CORPUS) and split["corpus"]["title"][0] == "Foxes"


def test_local_task_errors_are_pointed(tmp_path):
    with pytest.raises(FileNotFoundError, match="task.json"):
        LocalTaskInfo.from_folder(tmp_path)
    bad = write_sts_task(tmp_path / "bad", mteb_task="NoSuchTask")
    with pytest.raises(ValueError, match="NoSuchTask"):
        load_local_task(bad)
    wrong_split = write_sts_task(tmp_path / "split", mteb_task="LCQMC", split="dev")
    with pytest.raises(ValueError, match="does not evaluate split 'dev'"):
        load_local_task(wrong_split)
    wrong_type = write_retrieval_task(tmp_path / "type", mteb_task="STSBenchmark")
    with pytest.raises(ValueError, match="type 'retrieval'"):
        load_local_task(wrong_type)
    broken = write_retrieval_task(tmp_path / "qrels")
    (broken / "qrels" / "test.tsv").write_text("q\td\ts\nq1\td1\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="header"):
        load_local_task(broken)
    unknown = write_retrieval_task(tmp_path / "unknown")
    (unknown / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\nqX\td1\t1\n", encoding="utf-8")
    with pytest.raises(ValueError, match="not in queries.jsonl"):
        load_local_task(unknown)
    with pytest.raises(ValueError, match="corpus_cap"):
        prepare_task(bad, corpus_cap=0)
    with pytest.raises(TypeError, match="task must be"):
        prepare_task(3.5)


def test_prepare_tasks_matches_names_in_data_dir_and_rejects_duplicates(data_dir):
    prepared = prepare_tasks(["TinySTS", data_dir / "TinyRetrieval", "SciFact"], data_dir=data_dir)
    assert [(t.name, t.type, t.split) for t in prepared] == [
        ("TinySTS", "sts", "test"),
        ("TinyRetrieval", "retrieval", "test"),
        ("SciFact", "retrieval", "test"),
    ]
    assert prepared[2].source == str(data_dir / "SciFact")
    with pytest.raises(ValueError, match="duplicated"):
        prepare_tasks(["TinySTS", "TinySTS"], data_dir=data_dir)
    with pytest.raises(ValueError, match="several splits"):
        prepare_task(mteb.get_task("ATEC"))


# --------------------------------------------------------------------------------------------------- subsampling


def test_subsample_keeps_every_judged_passage_and_is_seeded():
    ids = [f"d{i}" for i in range(100)]
    corpus = Dataset.from_dict({"id": ids, "title": [""] * 100, "text": ids})
    qrels = {"q1": {"d3": 1, "d97": 0}, "q2": {"d50": 2}}
    small, info = subsample_corpus(corpus, qrels, max_documents=10, seed=7)
    kept = small["id"]
    assert len(kept) == 10 and {"d3", "d97", "d50"} <= set(kept)
    assert kept == sorted(kept, key=ids.index)  # original order
    assert info.to_dict() == {
        "max_documents": 10,
        "seed": 7,
        "documents_total": 100,
        "documents_kept": 10,
        "judged_documents": 3,
    }
    assert subsample_corpus(corpus, qrels, 10, seed=7)[0]["id"] == kept
    assert subsample_corpus(corpus, qrels, 10, seed=8)[0]["id"] != kept
    # Judged passages beyond the cap are all kept; nothing to drop means no record.
    assert len(subsample_corpus(corpus, qrels, 2, seed=0)[0]) == 3
    assert subsample_corpus(corpus, qrels, 100)[1] is None
    with pytest.raises(ValueError, match="max_documents"):
        subsample_corpus(corpus, qrels, 0)


# --------------------------------------------------------------------------------------------------- scores


def test_scores_equal_an_independent_computation(data_dir, models):
    model = models[0]
    tasks = prepare_tasks(["TinySTS", "TinyRetrieval", "STSBenchmark", "SciFact"], data_dir=data_dir)
    scores = {score.name: score for score in evaluate_model(model, tasks)}
    expected_sts, expected_ndcg = reference_sts_spearman(model), reference_ndcg_at_10(model)
    assert not math.isclose(expected_sts, 0.0, abs_tol=1e-3)
    for name in ("TinySTS", "STSBenchmark"):
        assert scores[name].main_score == pytest.approx(expected_sts, abs=1e-6)
        assert scores[name].main_score_name == "cosine_spearman"
    for name in ("TinyRetrieval", "SciFact"):
        assert scores[name].main_score == pytest.approx(expected_ndcg, abs=1e-5)
        assert scores[name].result.scores["test"][0]["main_score"] == scores[name].main_score
    summary = summarize_scores(list(scores.values()))
    assert summary == pytest.approx(
        {
            "sts_mean": expected_sts,
            "retrieval_mean": expected_ndcg,
            "mean_task_type": (expected_sts + expected_ndcg) / 2,
            "mean_task": (expected_sts + expected_ndcg) / 2,
        },
        abs=1e-5,
    )


def test_subsampled_score_is_marked_and_uses_the_kept_corpus(data_dir, models):
    (task,) = prepare_tasks(["TinyRetrieval"], data_dir=data_dir, corpus_cap=8, seed=3)
    kept = task.task.dataset["default"]["test"]["corpus"]["id"]
    assert len(kept) == 8 and task.corpus_subsample.documents_total == len(CORPUS)
    (score,) = evaluate_model(models[0], [task])
    assert score.main_score == pytest.approx(reference_ndcg_at_10(models[0], corpus_ids=kept), abs=1e-5)
    assert score.result.scores["test"][0]["corpus_subsample"]["documents_kept"] == 8


def test_two_models_in_a_row_get_their_own_scores_and_no_cache_is_touched(data_dir, models, monkeypatch):
    mteb_evaluate = importlib.import_module("mteb.evaluate")  # the module, not the function mteb re-exports

    def forbidden(*args, **kwargs):
        raise AssertionError("mteb's result cache must never be used")

    # Both models are anonymous to mteb ("no_model_name/available"): a cache lookup would confuse them.
    monkeypatch.setattr(mteb_evaluate._DEFAULT_CACHE, "load_task_result", forbidden)
    monkeypatch.setattr(mteb_evaluate._DEFAULT_CACHE, "save_to_cache", forbidden)
    evaluator = MTEBEvaluator(["STSBenchmark", "SciFact"], data_dir=data_dir)
    first, second = evaluator(models[0]), evaluator(models[1])
    for model, metrics in ((models[0], first), (models[1], second)):
        assert metrics["mteb_STSBenchmark_cosine_spearman"] == pytest.approx(reference_sts_spearman(model), abs=1e-6)
        assert metrics["mteb_SciFact_ndcg_at_10"] == pytest.approx(reference_ndcg_at_10(model), abs=1e-5)
    assert first["mteb_STSBenchmark_cosine_spearman"] != pytest.approx(second["mteb_STSBenchmark_cosine_spearman"])
    assert evaluator(models[0]) == first  # and back again


def test_evaluator_metrics_primary_metric_prompts_and_model_untouched(data_dir, models, tmp_path):
    model = models[0]
    prompts_before = dict(model.prompts)
    model.train()
    evaluator = MTEBEvaluator(
        ["TinySTS", "TinyRetrieval"],
        data_dir=data_dir,
        primary_metric="TinySTS",
        prompts={"TinySTS": "zzz "},
        name="dev",
    )
    metrics = evaluator(model, output_path=str(tmp_path), epoch=1, steps=5)
    assert model.training and model.prompts == prompts_before  # no side effects on the model
    assert set(metrics) == {
        "dev_TinySTS_cosine_spearman",
        "dev_TinyRetrieval_ndcg_at_10",
        "dev_sts_mean",
        "dev_retrieval_mean",
        "dev_mean_task_type",
        "dev_mean_task",
    }
    assert evaluator.primary_metric == "dev_TinySTS_cosine_spearman"
    # The STS prompt is prepended to both sentences; retrieval is unaffected.
    prompted = reference_sts_spearman(_Prefixed(model, "zzz "))
    assert metrics["dev_TinySTS_cosine_spearman"] == pytest.approx(prompted, abs=1e-6)
    assert metrics["dev_TinyRetrieval_ndcg_at_10"] == pytest.approx(reference_ndcg_at_10(model), abs=1e-5)
    rows = (tmp_path / "mteb_evaluation_dev_results.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,steps,TinySTS_cosine_spearman") and rows[1].startswith("1,5,")
    with pytest.raises(ValueError, match="primary_metric"):
        MTEBEvaluator(["TinySTS"], data_dir=data_dir, primary_metric="retrieval_mean")
    with pytest.raises(ValueError, match="instructions"):
        MTEBEvaluator(["TinySTS"], data_dir=data_dir, instructions="fr")


class _Prefixed:
    """Encodes with a text prefix, to check prompts independently of mteb."""

    def __init__(self, model, prefix: str) -> None:
        self.model, self.prefix = model, prefix

    def encode(self, texts, **kwargs):
        return self.model.encode([self.prefix + text for text in texts], **kwargs)


def test_evaluator_inside_a_short_trainer_run(data_dir, tmp_path):
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    model = build_tiny_model(seed=0)
    train = Dataset.from_dict({"anchor": [a for a, _, _ in STS_PAIRS], "positive": [b for _, b, _ in STS_PAIRS]})
    evaluator = MTEBEvaluator(["TinySTS", "TinyRetrieval"], data_dir=data_dir)
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model), evaluator=evaluator
    )
    before = evaluator(model)["mteb_mean_task"]
    trainer.train()
    logged = next(entry for entry in trainer.state.log_history if "eval_mteb_mean_task" in entry)
    # The evaluation at step 2 saw the final weights: it must equal a fresh computation on them.
    assert logged["eval_mteb_TinySTS_cosine_spearman"] == pytest.approx(reference_sts_spearman(model), abs=1e-6)
    assert logged["eval_mteb_TinyRetrieval_ndcg_at_10"] == pytest.approx(reference_ndcg_at_10(model), abs=1e-5)
    assert logged["eval_mteb_mean_task"] != pytest.approx(before)  # training changed the model and the score followed
    assert (tmp_path / "eval" / "mteb_evaluation_mteb_results.csv").is_file()
