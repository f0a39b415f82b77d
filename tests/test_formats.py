"""The three record formats (unified, FlagEmbedding, sentence-transformers columns): detection, merging, prompts,
refusals."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from datasets import Dataset

from codiemb_st import ir_dataset_from_records, sts_dataset_from_records
from codiemb_st.record_formats import read_ir_records, read_sts_records

UNIFIED = [
    {"query": "q0", "positives": ["p0a", "p0b"], "negatives": ["n0"]},
    {"query": "q1", "positives": ["p1"], "negatives": ["n1a", "n1b"]},
]
FLAG = [
    {"query": "q0", "pos": ["p0a", "p0b"], "neg": ["n0"], "pos_scores": [1, 1], "neg_scores": [0]},
    {"query": "q1", "pos": ["p1"], "neg": ["n1a", "n1b"]},
]
# sentence-transformers rows: one positive per row, so q0 comes twice (as mine_hard_negatives writes it).
ST_ROWS = [
    {"anchor": "q0", "positive": "p0a", "negative_1": "n0"},
    {"anchor": "q0", "positive": "p0b", "negative_1": "n0"},
    {"anchor": "q1", "positive": "p1", "negative_1": "n1a", "negative_2": "n1b"},
]
EXPECTED = {
    "q0": {"positives": ["p0a", "p0b"], "negatives": ["n0"]},
    "q1": {"positives": ["p1"], "negatives": ["n1a", "n1b"]},
}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _as_expected(records) -> dict:
    return {r["query"]: {"positives": r["positives"], "negatives": r["negatives"]} for r in records.records}


def test_three_formats_read_to_the_same_records(tmp_path, caplog):
    st_rows = [{**row, "negative_2": row.get("negative_2")} for row in ST_ROWS]  # tables need equal columns
    sources = {
        "unified": _jsonl(tmp_path / "u.jsonl", UNIFIED),
        "flagembedding": _jsonl(tmp_path / "f.jsonl", FLAG),
        "sentence-transformers": _jsonl(tmp_path / "s.jsonl", ST_ROWS),
    }
    Dataset.from_list(st_rows).to_csv(tmp_path / "s.csv")
    Dataset.from_list(st_rows).to_parquet(tmp_path / "s.parquet")
    with caplog.at_level(logging.INFO, logger="codiemb_st.data"):
        for expected_format, path in sources.items():
            records = read_ir_records(path)
            assert records.format == expected_format
            assert _as_expected(records) == EXPECTED
        for source in (tmp_path / "s.csv", tmp_path / "s.parquet", Dataset.from_list(st_rows)):
            records = read_ir_records(source)
            assert records.format == "sentence-transformers" and _as_expected(records) == EXPECTED
    messages = [r.getMessage() for r in caplog.records]
    assert any("f.jsonl: flagembedding format, 2 IR records" in m for m in messages), messages
    assert any("1 records with a repeated query were merged" in m for m in messages), messages
    # The FlagEmbedding scores are read (teacher scores for distillation), not reported as unused fields.
    assert not any("fields not used" in m for m in messages), messages
    flag = read_ir_records(sources["flagembedding"])
    assert flag.records[0]["positive_scores"] == [1.0, 1.0] and flag.records[0]["negative_scores"] == [0.0]
    assert flag.records[1]["positive_scores"] is None and flag.first_without_scores() is flag.records[1]


def test_duplicate_queries_are_merged_and_a_negative_equal_to_a_positive_is_dropped():
    rows = [
        {"query": "q", "positives": ["a"], "negatives": ["b", "x"]},
        {"query": "q", "positives": ["b"], "negatives": ["a", "y"]},
    ]
    records = read_ir_records(rows)
    assert records.merged == 1
    assert records.records[0]["positives"] == ["a", "b"] and records.records[0]["negatives"] == ["x", "y"]
    dataset = ir_dataset_from_records(rows, num_positives=2, num_negatives=2, seed=0)
    assert len(dataset) == 1 and {dataset[0]["negative_1"], dataset[0]["negative_2"]} == {"x", "y"}


def test_record_prompts_are_honoured():
    flag = [{**record, "prompt": "Find: "} for record in FLAG]
    records = read_ir_records(flag)
    assert records.common_prompt() == "Find: "
    dataset = ir_dataset_from_records(flag, num_positives=1, num_negatives=1)
    assert dataset["anchor"] == ["Find: q0", "Find: q1"] and not dataset["positive_1"][0].startswith("Find")
    # Symmetric FlagEmbedding types: the passages get the prompt too.
    symmetric = [{**record, "type": "symmetric_sts"} for record in flag]
    dataset = ir_dataset_from_records(symmetric, num_positives=1, num_negatives=1)
    assert all(text.startswith("Find: ") for column in dataset.column_names for text in dataset[column])
    # Different prompts in one file cannot be one dataset instruction: refused, naming both records.
    mixed = [flag[0], {**flag[1], "prompt": "Other: "}]
    with pytest.raises(ValueError, match=r"row 1: its `prompt` 'Other: ' differs from that of row 0"):
        read_ir_records(mixed).common_prompt()
    sts = sts_dataset_from_records([{"sentence1": "a", "sentence2": "b", "score": 1.0, "prompt": "Same: "}])
    assert sts[0]["sentence1"] == "Same: a" and sts[0]["sentence2"] == "Same: b"


def test_sts_in_all_formats():
    unified = [{"sentence1": "a", "sentence2": "b", "score": 2.0}]
    flag = [{"query": "a", "pos": ["b", "c"], "pos_scores": [2.0, 1.0]}]
    assert read_sts_records(flag).format == "flagembedding"
    assert sts_dataset_from_records(flag).to_dict() == sts_dataset_from_records(unified).to_dict()
    with pytest.raises(ValueError, match="needs `pos_scores`"):
        sts_dataset_from_records([{"query": "a", "pos": ["b"]}])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [UNIFIED[0], {"question": "q", "answer": "a"}],
            r"row 1: the record fits no IR record format; fields found: \['answer', 'question'\]. Each format needs: "
            r"unified: query, positives .*flagembedding: query, pos .*sentence-transformers: anchor, positive",
        ),
        ([UNIFIED[0], FLAG[1]], r"row 1: a flagembedding record in a file whose first record \(row 0\) is unified"),
        ([{"query": "q", "pos": []}], r"row 0: `pos` is empty"),
        ([{"anchor": "q", "negative": "n"}], r"row 0: the row has no positive"),
        ([{**FLAG[0], "type": "only_1neg"}, FLAG[1]], r"row 1: `type` None differs from that of row 0"),
        ([{"sentence1": "a", "sentence2": "b", "score": 1}], r"row 0: .*This looks like an STS pair"),
        ([{**FLAG[0], "prompt": 3}], r"row 0: `prompt` must be a string"),
    ],
)
def test_bad_records_are_refused_with_their_location(rows, message):
    with pytest.raises(ValueError, match=message):
        read_ir_records(rows)


def test_empty_and_unreadable_files(tmp_path):
    with pytest.raises(ValueError, match="No records in"):
        read_ir_records(_jsonl(tmp_path / "empty.jsonl", []))
    bad = tmp_path / "bad.parquet"
    bad.write_text("not parquet")
    with pytest.raises(ValueError, match=r"bad\.parquet: could not read it as parquet"):
        read_ir_records(bad)
    Dataset.from_list([{"anchor": "q", "positive": "p"}, {"anchor": "", "positive": "p"}]).to_csv(tmp_path / "s.csv")
    with pytest.raises(ValueError, match=r"s\.csv row 1: `anchor` must be a non-empty string"):
        read_ir_records(tmp_path / "s.csv")


def test_docs_own_data_example_runs_as_written(tmp_path, monkeypatch):
    from docs_examples import run_docs_example

    monkeypatch.chdir(tmp_path)
    namespace = run_docs_example("your-own-data.md", "own-data-example")
    rows = [json.loads(line) for line in (tmp_path / "pairs_mined.jsonl").read_text().splitlines()]
    assert all(set(row) == {"query", "pos", "neg", "prompt"} and len(row["neg"]) == 2 for row in rows)
    assert all(not set(row["neg"]) & set(row["pos"]) for row in rows)
    assert namespace["data"].option("pairs_mined").instruction == "Find the fact: "
    assert namespace["trainer"].state.global_step == 2


# Teacher scores in each format, for one query with two positives and two negatives (issue 30).
SCORED = {
    "unified": [
        {
            "query": "q",
            "positives": ["pa", "pb"],
            "negatives": ["na", "nb"],
            "positive_scores": [0.9, 0.8],
            "negative_scores": [0.3, 0.1],
        },
    ],
    "flagembedding": [
        {"query": "q", "pos": ["pa", "pb"], "neg": ["na", "nb"], "pos_scores": [0.9, 0.8], "neg_scores": [0.3, 0.1]},
    ],
    "sentence-transformers": [  # one positive per row, as mine_hard_negatives(output_scores=True) writes them
        {"anchor": "q", "positive": "pa", "negative_1": "na", "negative_2": "nb", "label": [0.9, 0.3, 0.1]},
        {"anchor": "q", "positive": "pb", "negative_1": "na", "negative_2": "nb", "label": [0.8, 0.3, 0.1]},
    ],
}
SCORE_OF = {"pa": 0.9, "pb": 0.8, "na": 0.3, "nb": 0.1}


@pytest.mark.parametrize("record_format", list(SCORED))
def test_teacher_scores_travel_with_their_texts(tmp_path, record_format):
    path = _jsonl(tmp_path / f"{record_format}.jsonl", SCORED[record_format])
    (record,) = read_ir_records(path).records
    assert record["positive_scores"] == [0.9, 0.8] and record["negative_scores"] == [0.3, 0.1]
    # Through the P/N draw (subsets and resampling with several seeds), each score stays with its text.
    for seed in range(5):
        for num_positives, num_negatives in ((1, 1), (2, 2), (3, 5)):
            row = ir_dataset_from_records(path, num_positives, num_negatives, seed, with_scores=True)[0]
            texts = [row[f"positive_{k}"] for k in range(1, num_positives + 1)]
            texts += [row[f"negative_{k}"] for k in range(1, num_negatives + 1)]
            assert row["label"] == pytest.approx([SCORE_OF[text] for text in texts])


def test_scores_are_dropped_with_their_texts_and_kept_through_merges(tmp_path):
    rows = [
        # the negative equal to a positive is dropped with its score; the repeated query merges, first score kept
        {
            "query": "q",
            "positives": ["pa"],
            "negatives": ["pa", "na"],
            "positive_scores": [0.9],
            "negative_scores": [0.5, 0.3],
        },
        {
            "query": "q",
            "positives": ["pb", "pa"],
            "negatives": ["nb"],
            "positive_scores": [0.8, 0.1],
            "negative_scores": [0.2],
        },
    ]
    (record,) = read_ir_records(_jsonl(tmp_path / "r.jsonl", rows)).records
    assert record["positives"] == ["pa", "pb"] and record["positive_scores"] == [0.9, 0.8]
    assert record["negatives"] == ["na", "nb"] and record["negative_scores"] == [0.3, 0.2]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [{"query": "q", "pos": ["p"], "neg": ["n"], "pos_scores": [0.9, 0.1]}],
            r"r.jsonl:1: `pos_scores` must be a list with one teacher score per text \(1\); got 2 scores",
        ),
        (
            [{"query": "q", "positives": ["p"], "positive_scores": [float("nan")]}],
            r"r.jsonl:1: `positive_scores\[0\]` must be a finite number",
        ),
        (
            [{"anchor": "q", "positive": "p", "negative_1": "n", "label": [0.9]}],
            r"r.jsonl:1: `label` has 1 scores for the row's 2 texts",
        ),
    ],
)
def test_bad_teacher_scores_name_file_line_and_field(tmp_path, rows, message):
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ValueError, match=message):
        read_ir_records(path)


def test_distillation_needs_every_score_and_says_which_record_lacks_one(tmp_path):
    from codiemb_st.recipe import load_task_datasets

    rows = [SCORED["flagembedding"][0], {"query": "q2", "pos": ["p2"], "neg": ["n2"]}]
    path = _jsonl(tmp_path / "flag.jsonl", rows)
    with pytest.raises(ValueError, match=r"flag.jsonl:2: positive 'p2' has no teacher score"):
        load_task_datasets(ir=[path], teacher_scores=True)
    unscored = _jsonl(tmp_path / "plain.jsonl", [{"query": "q", "pos": ["p"], "neg": ["n"]}])
    with pytest.raises(ValueError, match=r"plain.jsonl:1: dataset 'plain' is trained with distillation but its"):
        load_task_datasets(ir=[unscored], teacher_scores=True)
    data = load_task_datasets(ir=[path])  # without distillation the scores are left out, with a counted warning
    assert not data.has_scores("flag") and data.datasets["flag"].column_names[-1] == "negative_2"
