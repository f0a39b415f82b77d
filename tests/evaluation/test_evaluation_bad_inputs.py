"""Bad evaluation data (local task folders): the right exception naming the file and what to do.

Part of the bad-input tables (shared pieces: tests/bad_input_cases.py; the count: tests/test_bad_input_count.py).
"""

from __future__ import annotations

import logging

import pytest
from bad_input_cases import (
    GOOD_PAIR,
    Case,
    _retrieval_folder,
    _sts_folder,
    _task_json,
    run_case,
)

from codiemb_st.evaluation import MTEBEvaluator, load_local_task, prepare_task
from codiemb_st.evaluation.local_data import LocalTaskInfo

EVALUATION_CASES = [
    Case(  # one rule (codiemb_st.validation): a wrong type is a TypeError naming the argument
        "prepare-corpus-cap-string",
        lambda e: prepare_task(_sts_folder(e, [GOOD_PAIR]), corpus_cap="100"),
        TypeError,
        "`corpus_cap` must be an integer",
    ),
    Case(
        "evaluator-batch-size-float",
        lambda e: MTEBEvaluator([_sts_folder(e, [GOOD_PAIR])], batch_size=8.0),
        TypeError,
        "`batch_size` must be an integer",
    ),
    Case(
        "task-folder-sts-score-nan",
        lambda e: load_local_task(_sts_folder(e, [GOOD_PAIR, '{"sentence1": "a", "sentence2": "b", "score": NaN}'])),
        ValueError,
        r"BadSTS/test\.jsonl:2: `score` must be a finite number; got nan",
    ),
    Case(
        "task-folder-sts-score-null",
        lambda e: load_local_task(_sts_folder(e, [GOOD_PAIR, {**GOOD_PAIR, "score": None}])),
        ValueError,
        r"test\.jsonl:2: `score` must be a finite number; got None",
    ),
    Case(
        "task-folder-sts-score-string",
        lambda e: load_local_task(_sts_folder(e, [{**GOOD_PAIR, "score": "high"}])),
        ValueError,
        r"test\.jsonl:1: `score` must be a finite number; got 'high'",
    ),
    Case(
        "task-folder-sts-score-bool",
        lambda e: load_local_task(_sts_folder(e, [{**GOOD_PAIR, "score": True}])),
        ValueError,
        r"test\.jsonl:1: `score`",
    ),
    Case(
        "sts-sentence-not-text",
        lambda e: load_local_task(_sts_folder(e, [GOOD_PAIR, {**GOOD_PAIR, "sentence2": 7}])),
        ValueError,
        r"test\.jsonl:2: `sentence2` must be a string; got 7",
    ),
    Case(
        "sts-field-missing",
        lambda e: load_local_task(_sts_folder(e, [{"sentence1": "a", "sentence2": "b"}])),
        ValueError,
        r"test\.jsonl:1 lacks the field\(s\) \['score'\]",
    ),
    Case(
        "qrels-passage-not-in-corpus",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\t1\nq1\td9\t1\n")),
        ValueError,
        r"qrels/test\.tsv judges 1 passage id\(s\) that are not in .*corpus\.jsonl \(e\.g\. \['d9'\]\).*"
        r"missing_passages",
    ),
    Case(
        "qrels-fractional-grade",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\t0.5\n")),
        ValueError,
        r"qrels/test\.tsv:2: score '0\.5' must be an integer relevance grade",
    ),
    Case(
        "qrels-nan-grade",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\tnan\n")),
        ValueError,
        r"qrels/test\.tsv:2: score 'nan'",
    ),
    Case(
        "qrels-inf-grade",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\tinf\n")),
        ValueError,
        r"qrels/test\.tsv:2: score 'inf'",
    ),
    Case(
        "qrels-duplicate",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\t1\nq1\td1\t2\n")),
        ValueError,
        r"qrels/test\.tsv:3: query 'q1' judges passage 'd1' twice",
    ),
    Case(
        "qrels-two-columns",
        lambda e: load_local_task(_retrieval_folder(e, qrels="q1\td1\n")),
        ValueError,
        r"qrels/test\.tsv:2 needs three tab-separated columns",
    ),
    Case(
        "corpus-duplicate-id",
        lambda e: load_local_task(
            _retrieval_folder(e, corpus=[{"_id": "d1", "text": "x"}, {"_id": "d1", "text": "y"}])
        ),
        ValueError,
        r"corpus\.jsonl:2: `_id` 'd1' repeats the id of .*corpus\.jsonl:1",
    ),
    Case(
        "corpus-text-null",
        lambda e: load_local_task(
            _retrieval_folder(e, corpus=[{"_id": "d1", "text": None}, {"_id": "d2", "text": "y"}])
        ),
        ValueError,
        r"corpus\.jsonl:1: `text` must be a string; got null",
    ),
    Case(
        "queries-id-null",
        lambda e: load_local_task(_retrieval_folder(e, queries=[{"_id": None, "text": "q"}])),
        ValueError,
        r"queries\.jsonl:1: `_id` must be a non-empty string or integer; got None",
    ),
    Case(
        "task-json-invalid",
        lambda e: LocalTaskInfo.from_folder(_task_json(e, "{")),
        ValueError,
        r"task\.json is not valid JSON",
    ),
    Case(
        "task-json-not-utf8",
        lambda e: LocalTaskInfo.from_folder(_task_json(e, b'{"name": "\xff"}')),
        ValueError,
        r"task\.json is not UTF-8",
    ),
    Case(
        "task-json-a-list",
        lambda e: LocalTaskInfo.from_folder(_task_json(e, "[]")),
        ValueError,
        r"task\.json must hold a JSON object",
    ),
    Case(
        "task-json-min-score-string",
        lambda e: LocalTaskInfo.from_folder(_sts_folder(e, [GOOD_PAIR], {"min_score": "0"})),
        ValueError,
        r"task\.json: `min_score` must be a finite number; got '0'",
    ),
    Case(
        "task-json-scores-reversed",
        lambda e: LocalTaskInfo.from_folder(_sts_folder(e, [GOOD_PAIR], {"min_score": 5, "max_score": 0})),
        ValueError,
        r"`min_score` \(5\) is above `max_score` \(0\)",
    ),
    Case(
        "task-json-missing-passages-value",
        lambda e: LocalTaskInfo.from_folder(_retrieval_folder(e, meta={"missing_passages": "ignore"})),
        ValueError,
        r"`missing_passages` must be one of \['error', 'drop'\]; got 'ignore'",
    ),
    Case(
        "unknown-task-with-data-dir",
        lambda e: prepare_task("NoSuchTask", data_dir=_sts_folder(e, [GOOD_PAIR]).parent),
        ValueError,
        r"Unknown task 'NoSuchTask': no task folder in .* matches it .*\(BadSTS\); mteb has no task",
    ),
    Case(
        "unknown-task-without-data-dir",
        lambda e: prepare_task("NoSuchTask"),
        ValueError,
        r"Unknown task 'NoSuchTask': no local folders were searched \(no data_dir given\)",
    ),
    Case(
        "task-folder-without-task-json",
        lambda e: prepare_task(str(e.tmp)),
        ValueError,
        r"the folder .* has no task\.json",
    ),
]


def test_missing_passages_opt_in_drops_those_judgments(env, caplog):
    caplog.set_level(logging.WARNING)
    folder = _retrieval_folder(env, qrels="q1\td1\t1\nq1\td9\t1\n", meta={"missing_passages": "drop"})
    task = load_local_task(folder)
    assert task.dataset["default"]["test"]["relevant_docs"] == {"q1": {"d1": 1}}
    assert "dropped the judgments of 1 passage id(s)" in caplog.text and "d9" in caplog.text


@pytest.mark.parametrize("case", EVALUATION_CASES, ids=[f"evaluation:{case.id}" for case in EVALUATION_CASES])
def test_bad_input_gets_a_clear_answer(case, env):
    run_case(case, env)
