from __future__ import annotations

import gzip
import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset

from codiemb_st import dataset_from_records, ir_dataset_from_records, read_records, sts_dataset_from_records

# ../shared/data/train next to the checkout (a git worktree may sit one level deeper).
TRAIN_DATA = next(
    (
        parent / "shared" / "data" / "train"
        for parent in Path(__file__).resolve().parents
        if (parent / "shared" / "data" / "train").is_dir()
    ),
    Path(__file__).resolve().parents[1].parent / "shared" / "data" / "train",
)

IR_RECORDS = [
    {"query": "q0", "positives": ["p0"], "negatives": ["n0a", "n0b", "n0c", "n0d", "n0e"]},
    {"query": "q1", "positives": ["p1a", "p1b"], "negatives": ["n1"]},
    {"query": "q2", "positives": ["p2a", "p2b", "p2c", "p2d"], "negatives": ["n2a", "n2b"]},
]


def write_jsonl(path: Path, lines: list[str]) -> Path:
    text = "\n".join(lines) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as handle:
            handle.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_ir_columns_subsets_and_resampling(caplog):
    with caplog.at_level(logging.INFO, logger="codiemb_st.data"):
        dataset = ir_dataset_from_records(IR_RECORDS, num_positives=3, num_negatives=2, seed=0)
    assert dataset.column_names == ["anchor", "positive_1", "positive_2", "positive_3", "negative_1", "negative_2"]
    assert dataset["anchor"] == ["q0", "q1", "q2"]
    for row, record in zip(dataset, IR_RECORDS):
        positives = [row[f"positive_{k}"] for k in (1, 2, 3)]
        negatives = [row[f"negative_{k}"] for k in (1, 2)]
        assert set(positives) <= set(record["positives"]) and set(negatives) <= set(record["negatives"])
        if len(record["positives"]) <= 3:  # padded: every available positive is kept at least once
            assert set(positives) == set(record["positives"])
        else:  # enough: a subset without repeats
            assert len(set(positives)) == 3
        if len(record["negatives"]) >= 2:
            assert len(set(negatives)) == 2
        else:
            assert negatives == ["n1", "n1"]
    # Positives: q0 (1 -> +2) and q1 (2 -> +1) padded, q2 (4 -> 3) truncated. Negatives: q1 (1 -> +1) padded,
    # q0 (5 -> 2) truncated, q2 exact.
    messages = [record.getMessage() for record in caplog.records]
    assert any("2 of 3 had fewer than 3 positives; 3 positives were resampled" in m for m in messages), messages
    assert any("1 of 3 had fewer than 2 negatives; 1 negatives were resampled" in m for m in messages), messages
    assert any("1 of 3 had more than 3 positives; 1 positives were left out" in m for m in messages), messages
    assert any("1 of 3 had more than 2 negatives; 3 negatives were left out" in m for m in messages), messages


def test_ir_draws_are_seeded():
    many = [{"query": f"q{i}", "positives": [f"p{i}_{j}" for j in range(6)]} for i in range(20)]
    first = ir_dataset_from_records(many, num_positives=2, seed=3)
    assert first.to_dict() == ir_dataset_from_records(many, num_positives=2, seed=3).to_dict()
    assert first.to_dict() != ir_dataset_from_records(many, num_positives=2, seed=4).to_dict()
    # num_negatives=0 gives no negative columns and accepts records without negatives
    assert first.column_names == ["anchor", "positive_1", "positive_2"]


def test_sources_agree(tmp_path):
    lines = [json.dumps(record) for record in IR_RECORDS]
    expected = ir_dataset_from_records(IR_RECORDS, num_positives=2, num_negatives=1, seed=1).to_dict()
    for source in (
        write_jsonl(tmp_path / "ir.jsonl", lines),
        write_jsonl(tmp_path / "ir.jsonl.gz", lines),
        Dataset.from_list(IR_RECORDS),
        iter(IR_RECORDS),
    ):
        assert ir_dataset_from_records(source, num_positives=2, num_negatives=1, seed=1).to_dict() == expected


def test_sts_both_record_forms(caplog):
    records = [
        {"sentence1": "a", "sentence2": "b", "score": 4},
        {"task_type": "sts", "query": "c", "positives": ["d", "e"], "positive_scores": [0.5, 0.1]},
    ]
    with caplog.at_level(logging.INFO, logger="codiemb_st.data"):
        dataset = sts_dataset_from_records(records)
    assert dataset.to_dict() == {"sentence1": ["a", "c"], "sentence2": ["b", "d"], "score": [4.0, 0.5]}
    assert any("left out 1 more" in record.getMessage() for record in caplog.records)


def test_task_inference(tmp_path):
    sts = write_jsonl(tmp_path / "sts.jsonl", [json.dumps({"sentence1": "a", "sentence2": "b", "score": 1.0})])
    assert dataset_from_records(sts).column_names == ["sentence1", "sentence2", "score"]
    # N defaults to the records' own count: their negatives are kept, not dropped.
    columns = dataset_from_records(iter(IR_RECORDS)).column_names
    assert columns[:2] == ["anchor", "positive_1"] and "negative_1" in columns
    unified_sts = [{"task_type": "sts", "query": "a", "positives": ["b"], "positive_scores": [2.0]}]
    assert dataset_from_records(unified_sts).column_names == ["sentence1", "sentence2", "score"]
    with pytest.raises(ValueError, match="`task` must be 'ir', 'sts' or None"):
        dataset_from_records(unified_sts, task="nli")


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"query": "q", "positives": ["p"]', "invalid JSON"),
        ('["q", "p"]', "expected a JSON object"),
        ('{"positives": ["p"]}', "`query` must be a non-empty string; got missing"),
        ('{"query": "  ", "positives": ["p"]}', "`query` must be a non-empty string"),
        ('{"query": "q", "positives": []}', "`positives` is empty"),
        ('{"query": "q", "positives": "p"}', "`positives` must be a list of strings; got str"),
        ('{"query": "q", "positives": ["p", 3]}', r"`positives\[1\]` must be a non-empty string; got 3"),
        ('{"query": "q", "positives": ["p"], "negatives": [null]}', r"`negatives\[0\]` must be a non-empty string"),
        ('{"task_type": "sts", "query": "q", "positives": ["p"]}', "convert this file with sts_dataset_from_records"),
    ],
)
def test_ir_errors_name_file_and_line(tmp_path, line, message):
    good = json.dumps({"query": "ok", "positives": ["p"], "negatives": ["n"]})
    path = write_jsonl(tmp_path / "bad.jsonl.gz", [good, "", line])  # the bad record is on line 3
    with pytest.raises(ValueError, match=message) as error:
        ir_dataset_from_records(path, num_negatives=1)
    assert str(error.value).startswith(f"{path}:3: ")


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"sentence1": "a", "sentence2": "b"}, "`score` must be a finite number; got missing"),
        ({"sentence1": "a", "sentence2": "b", "score": "high"}, "`score` must be a finite number; got 'high'"),
        ({"sentence1": "a", "sentence2": "b", "score": True}, "`score` must be a finite number"),
        ({"sentence1": "a", "sentence2": "b", "score": float("nan")}, "`score` must be a finite number"),
        ({"sentence1": "a", "score": 1.0}, "`sentence2` must be a non-empty string"),
        ({"query": "a", "positives": ["b"]}, "needs `positive_scores`"),
        ({"query": "a", "positives": ["b", "c"], "positive_scores": [1.0]}, "one score per positive"),
        ({"text": "a"}, r"not an STS record; .*got \['text'\]"),
        ({"task_type": "ir", "query": "a", "positives": ["b"]}, "convert this file with ir_dataset_from_records"),
    ],
)
def test_sts_errors_name_the_row(record, message):
    with pytest.raises(ValueError, match=message) as error:
        sts_dataset_from_records([{"sentence1": "x", "sentence2": "y", "score": 0.0}, record])
    assert str(error.value).startswith("row 1: ")


def test_bad_arguments_and_sources(tmp_path):
    with pytest.raises(ValueError, match="`num_positives` must be an integer >= 1"):
        ir_dataset_from_records(IR_RECORDS, num_positives=0)
    with pytest.raises(ValueError, match="`num_negatives` must be an integer >= 0"):
        ir_dataset_from_records(IR_RECORDS, num_negatives=-1)
    with pytest.raises(ValueError, match="No records in"):
        ir_dataset_from_records(write_jsonl(tmp_path / "empty.jsonl", [""]))
    with pytest.raises(FileNotFoundError):
        list(read_records(tmp_path / "missing.jsonl"))
    with pytest.raises(TypeError, match="must be a JSONL path, a datasets.Dataset or an iterable of dicts"):
        list(read_records({"query": "q"}))


def test_shared_training_files():
    """The project's English training files convert with the row counts of their README."""
    sts = sts_dataset_from_records(TRAIN_DATA / "en_stsb.jsonl.gz")
    assert len(sts) == 5732 and min(sts["score"]) == 0.0 and max(sts["score"]) == 5.0
    ir = ir_dataset_from_records(TRAIN_DATA / "en_snli.jsonl.gz", num_positives=1, num_negatives=1)
    with gzip.open(TRAIN_DATA / "en_snli.jsonl.gz", "rt", encoding="utf-8") as handle:
        raw = [json.loads(line) for line in handle]
    assert len(ir) == len(raw) == 5863
    for row, record in zip(ir, raw):
        assert row["anchor"] == record["query"]
        assert row["positive_1"] in record["positives"] and row["negative_1"] in record["negatives"]


def test_a_record_without_negatives_borrows_them_and_the_others_keep_theirs(tmp_path, caplog):
    # Symptoms of issue 29: one record whose only negative equals its positive (dropped) turned the whole file into
    # in-batch negatives (INFO), and the default num_negatives=0 of the converter dropped every negative silently.
    rows = [
        {"query": "q1", "positives": ["p1"], "negatives": ["p1"]},
        {"query": "q2", "positives": ["p2"], "negatives": ["n2a", "n2b"]},
        {"query": "q3", "positives": ["p3"], "negatives": ["n3a", "n3b"]},
    ]
    path = write_jsonl(tmp_path / "ir.jsonl", [json.dumps(row) for row in rows])
    with caplog.at_level(logging.WARNING, logger="codiemb_st.data"):
        dataset = ir_dataset_from_records(path)  # N: the records' own count (2)
    assert dataset.column_names == ["anchor", "positive_1", "negative_1", "negative_2"]
    by_query = {row["anchor"]: {row["negative_1"], row["negative_2"]} for row in dataset}
    assert by_query["q2"] == {"n2a", "n2b"} and by_query["q3"] == {"n3a", "n3b"}
    assert by_query["q1"] <= {"n2a", "n2b", "n3a", "n3b"}  # borrowed, never its own positive
    messages = caplog.text
    assert "dropped 1 negatives equal to a positive of their own query (first: " in messages
    assert "1 of 3 have no hard negatives (first: " in messages and "ir.jsonl:1" in messages
