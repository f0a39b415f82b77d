"""Bad training records (files, lines, fields): the right exception naming file:line and the field.

Part of the bad-input tables (shared pieces: tests/bad_input_cases.py; the count: tests/test_bad_input_count.py).
"""

from __future__ import annotations

import logging
import re

import pytest
from bad_input_cases import (
    IR_RECORD,
    STS_RECORD,
    Case,
    _not_gzip,
    _not_utf8,
    _truncated_gzip,
    _write,
    run_case,
)

from codiemb_st import (
    dataset_from_records,
    ir_dataset_from_records,
    read_records,
    sts_dataset_from_records,
)

RECORD_CASES = [
    Case("gz-not-gzip", _not_gzip, ValueError, r"train\.jsonl\.gz: the file name ends in \.gz but .*not gzip"),
    Case("gz-truncated", _truncated_gzip, ValueError, r"train\.jsonl\.gz: corrupt or truncated gzip"),
    Case("not-utf8", _not_utf8, ValueError, r"latin1\.jsonl:2: the file is not UTF-8"),
    Case(
        "invalid-json-line",
        lambda e: sts_dataset_from_records(_write(e.tmp / "s.jsonl", [STS_RECORD, "{oops"])),
        ValueError,
        r"s\.jsonl:2: invalid JSON",
    ),
    Case(
        "task-type-unknown-inferred",
        lambda e: dataset_from_records(_write(e.tmp / "c.jsonl", [{**IR_RECORD, "task_type": "classification"}])),
        ValueError,
        r"c\.jsonl:1: `task_type` must be 'ir' or 'sts'; got 'classification'",
    ),
    Case(
        "task-type-unknown-explicit",
        lambda e: ir_dataset_from_records([IR_RECORD, {**IR_RECORD, "task_type": "nli"}]),
        ValueError,
        r"row 1: `task_type` must be 'ir' or 'sts' \(or absent\); got 'nli'",
    ),
    Case(
        "task-type-other-task",
        lambda e: ir_dataset_from_records([{**STS_RECORD, "task_type": "sts"}]),
        ValueError,
        "row 0: record has task_type 'sts'.*convert this file with sts_dataset_from_records",
    ),
    Case(
        "task-argument-unknown",
        lambda e: dataset_from_records([IR_RECORD], task="classification"),
        ValueError,
        "`task` must be 'ir', 'sts' or None; got 'classification'",
    ),
    Case(
        "num-positives-string",
        lambda e: ir_dataset_from_records([IR_RECORD], num_positives="2"),
        TypeError,
        "`num_positives` must be an integer; got str",
    ),
    Case(
        "num-negatives-negative",
        lambda e: ir_dataset_from_records([IR_RECORD], num_negatives=-1),
        ValueError,
        "`num_negatives` must be an integer >= 0",
    ),
    Case(
        "seed-string", lambda e: ir_dataset_from_records([IR_RECORD], seed="x"), TypeError, "`seed` must be an integer"
    ),
    Case(
        "sts-score-null",
        lambda e: sts_dataset_from_records(_write(e.tmp / "n.jsonl", [{**STS_RECORD, "score": None}])),
        ValueError,
        r"n\.jsonl:1: `score` must be a finite number; got missing",
    ),
    Case(
        "sts-score-string",
        lambda e: sts_dataset_from_records([STS_RECORD, {**STS_RECORD, "score": "4.5"}]),
        ValueError,
        r"row 1: `score` must be a finite number; got '4.5'",
    ),
    Case(
        "sts-score-nan",
        lambda e: sts_dataset_from_records(
            _write(e.tmp / "nan.jsonl", ['{"sentence1": "a", "sentence2": "b", "score": NaN}'])
        ),
        ValueError,
        r"nan\.jsonl:1: `score`.*got nan",
    ),
    Case(
        "ir-positives-string",
        lambda e: ir_dataset_from_records([{"query": "q", "positives": "p"}]),
        ValueError,
        r"row 0: `positives` must be a list of strings; got str",
    ),
    Case(
        "ir-positives-empty",
        lambda e: ir_dataset_from_records([{"query": "q", "positives": []}]),
        ValueError,
        r"row 0: `positives` is empty",
    ),
    Case(
        "ir-needs-negatives",
        lambda e: ir_dataset_from_records([{"query": "q", "positives": ["p"]}], num_negatives=1),
        ValueError,
        "row 0: no record has negatives but num_negatives=1",
    ),
    Case(
        "record-not-object",
        lambda e: list(read_records(_write(e.tmp / "l.jsonl", [[1, 2]]))),
        ValueError,
        r"l\.jsonl:1: expected a JSON object",
    ),
    Case(
        "file-missing",
        lambda e: ir_dataset_from_records(e.tmp / "missing.jsonl"),
        FileNotFoundError,
        r"missing\.jsonl",
    ),
    Case(
        "source-is-a-dict",
        lambda e: ir_dataset_from_records(IR_RECORD),
        TypeError,
        "`source` must be a JSONL path, a datasets.Dataset or an iterable of dicts",
    ),
]


def test_ir_records_with_negatives_under_another_key_warn(env, caplog):
    records = [{"query": f"q{i}", "positives": [f"p{i}"], "neg": [f"n{i}"]} for i in range(3)]
    path = _write(env.tmp / "flag.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="codiemb_st.data"):
        dataset = ir_dataset_from_records(path, num_negatives=0)
    assert dataset.column_names == ["anchor", "positive_1"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1  # once per key and file, not once per record
    assert re.search(
        r"flag\.jsonl:1: the IR record has a 'neg' key, which is not read.*Rename 'neg' to 'negatives'", warnings[0]
    )


def test_gz_that_is_not_gzip_says_what_to_do(env):
    with pytest.raises(
        ValueError, match=r"not gzip-compressed\. .*drop the \.gz suffix \(rename it to train\.jsonl\)"
    ):
        _not_gzip(env)


@pytest.mark.parametrize("case", RECORD_CASES, ids=[f"records:{case.id}" for case in RECORD_CASES])
def test_bad_input_gets_a_clear_answer(case, env):
    run_case(case, env)
