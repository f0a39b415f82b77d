"""Teacher scoring (issue 30): `codiemb_st.scoring` and `codiemb-st score` give every positive and negative of IR
records a teacher score (cross-encoder logits or bi-encoder cosines), in the records' own format, resumably."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from kill_harness import kill_when_signalled
from sentence_transformers import CrossEncoder, SentenceTransformer
from tiny_model import ENGLISH_SENTENCES, save_tiny_cross_encoder

from codiemb_st.cli import main
from codiemb_st.record_formats import read_ir_records
from codiemb_st.scoring import load_teacher, score_records, teacher_kind

REPO_ROOT = Path(__file__).resolve().parents[1]
RECORDS = [
    {
        "query": query,
        "positives": [ENGLISH_SENTENCES[(i + 1) % 10], ENGLISH_SENTENCES[(i + 2) % 10]],
        "negatives": [ENGLISH_SENTENCES[(i + 5) % 10]],
    }
    for i, query in enumerate(ENGLISH_SENTENCES)
]


@pytest.fixture(scope="module")
def cross_encoder_path(tmp_path_factory) -> Path:
    return save_tiny_cross_encoder(tmp_path_factory.mktemp("teacher") / "ce")


def test_teacher_kind_and_loading(cross_encoder_path, tiny_model_path, tmp_path):
    assert teacher_kind(cross_encoder_path) == "cross-encoder"
    assert teacher_kind(save_tiny_cross_encoder(tmp_path / "plain", as_cross_encoder=False)) == "cross-encoder"
    assert teacher_kind(tiny_model_path) == "bi-encoder"
    assert isinstance(load_teacher(str(cross_encoder_path)), CrossEncoder)
    assert isinstance(load_teacher(str(tiny_model_path)), SentenceTransformer)
    with pytest.raises(ValueError, match="`kind` must be one of"):
        load_teacher(str(tiny_model_path), kind="reranker")


def test_cross_encoder_scores_are_its_raw_logits(cross_encoder_path):
    teacher = CrossEncoder(str(cross_encoder_path), device="cpu")
    scored = score_records(RECORDS, teacher, batch_size=3, chunk_size=4, show_progress_bar=False)
    for record in scored.records:
        pairs = [(record["query"], text) for text in record["positives"] + record["negatives"]]
        expected = teacher.predict(pairs, activation_fn=torch.nn.Identity()).tolist()
        assert record["positive_scores"] + record["negative_scores"] == pytest.approx(expected, abs=1e-5)
    assert len({round(s, 6) for r in scored.records for s in r["positive_scores"]}) > 1  # not a constant


def test_bi_encoder_scores_are_cosine_similarities(tiny_model):
    scored = score_records(RECORDS, tiny_model, batch_size=4, show_progress_bar=False)
    for record in scored.records:
        query = tiny_model.encode_query([record["query"]], convert_to_tensor=True, normalize_embeddings=True)
        texts = tiny_model.encode_document(
            record["positives"] + record["negatives"], convert_to_tensor=True, normalize_embeddings=True
        )
        expected = (texts @ query[0]).tolist()
        assert record["positive_scores"] + record["negative_scores"] == pytest.approx(expected, abs=1e-5)


def test_bad_teacher_is_a_type_error():
    with pytest.raises(TypeError, match="`teacher` must be a CrossEncoder or a SentenceTransformer"):
        score_records(RECORDS, torch.nn.Linear(2, 2))


@pytest.mark.parametrize("suffix", ["unified.jsonl", "flag.jsonl", "st.parquet"])
def test_score_command_writes_the_scores_in_the_inputs_format_and_they_train(
    suffix, cross_encoder_path, tmp_path, capsys
):
    rows = {
        "unified.jsonl": RECORDS,
        "flag.jsonl": [{"query": r["query"], "pos": r["positives"], "neg": r["negatives"]} for r in RECORDS],
        "st.parquet": [
            {"anchor": r["query"], "positive": p, "negative_1": r["negatives"][0]}
            for r in RECORDS
            for p in r["positives"]
        ],
    }[suffix]
    source = tmp_path / f"in_{suffix}"
    if suffix.endswith(".parquet"):
        from datasets import Dataset

        Dataset.from_list(rows).to_parquet(str(source))
    else:
        source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / f"scored_{suffix}"
    assert main(["score", str(source), "--teacher", str(cross_encoder_path), "--output", str(out)]) == 0
    assert "Scored" in capsys.readouterr().out
    back = read_ir_records(out)
    assert back.format == read_ir_records(source).format and back.first_without_scores() is None
    direct = score_records(source, CrossEncoder(str(cross_encoder_path)), show_progress_bar=False)
    for got, expected in zip(back.records, direct.records):
        assert got["positive_scores"] == pytest.approx(expected["positive_scores"], abs=1e-5)
        assert got["negative_scores"] == pytest.approx(expected["negative_scores"], abs=1e-5)
    assert not list(tmp_path.glob(".*score-progress*"))  # the progress file is gone once the output is written

    from codiemb_st.recipe import load_task_datasets

    data = load_task_datasets(ir=[out], num_positives=2, teacher_scores=True)
    assert data.has_scores(out.name.split(".")[0]) and len(data.datasets[out.name.split(".")[0]][0]["label"]) == 3


def test_score_command_refuses_an_output_on_its_input(cross_encoder_path, tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in RECORDS))
    assert main(["score", str(source), "--teacher", str(cross_encoder_path), "--output", str(source)]) == 2
    assert f"--output {source} is the input file {source}" in capsys.readouterr().err
    assert (
        main(["score", str(source), "--teacher", str(tmp_path / "none"), "--output", str(tmp_path / "o.jsonl")]) == 2
    )
    assert "--teacher" in capsys.readouterr().err


# Scores with a teacher whose every chunk after the first stalls, so that the run can be killed part-way.
_KILLED_SCORE = """
import sys, time
from pathlib import Path
import codiemb_st.scoring as scoring
source, teacher, out, signal_file = sys.argv[1:5]
real = scoring.score_pairs
calls = {"n": 0}
def slow_after_the_first_chunk(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
        Path(signal_file).touch()
        time.sleep(600)
    return real(*args, **kwargs)
scoring.score_pairs = slow_after_the_first_chunk
from codiemb_st.cli import main
main(["score", source, "--teacher", teacher, "--output", out, "--chunk-size", "3"])
"""


def test_score_killed_part_way_continues_where_it_stopped(cross_encoder_path, tmp_path, monkeypatch, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(row) + "\n" for row in RECORDS))
    out, signal_file = tmp_path / "scored.jsonl", tmp_path / "stalled"
    argv = [sys.executable, "-c", _KILLED_SCORE, str(source), str(cross_encoder_path), str(out), str(signal_file)]
    kill_when_signalled(argv, signal_file, "reached its third chunk")
    assert not out.exists()  # nothing half-written at the output
    progress = tmp_path / ".scored.jsonl.score-progress.jsonl"
    assert len(progress.read_text().splitlines()) == 1 + 6  # the header and the two finished chunks of 3 records

    import codiemb_st.scoring as scoring

    scored_pairs = []
    real = scoring.score_pairs

    def counting(teacher, queries, texts, **kwargs):
        scored_pairs.append(len(queries))
        return real(teacher, queries, texts, **kwargs)

    monkeypatch.setattr(scoring, "score_pairs", counting)
    assert (
        main(["score", str(source), "--teacher", str(cross_encoder_path), "--output", str(out), "--chunk-size", "3"])
        == 0
    )
    assert sum(scored_pairs) == 4 * 3  # only the 4 records left, 3 pairs each
    reference = tmp_path / "reference.jsonl"
    monkeypatch.setattr(scoring, "score_pairs", real)
    assert main(["score", str(source), "--teacher", str(cross_encoder_path), "--output", str(reference)]) == 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    expected = [json.loads(line) for line in reference.read_text().splitlines()]
    for a, b in zip(got, expected):
        assert a["positive_scores"] == pytest.approx(b["positive_scores"], abs=1e-5)
    assert not progress.exists()


def test_a_bi_encoder_teacher_reads_the_mining_cache(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = score_records(RECORDS, tiny_model, cache_dir=cache, show_progress_bar=False)
    direct = score_records(RECORDS, tiny_model, show_progress_bar=False)
    for cached, plain in zip(first.records, direct.records):
        assert cached["positive_scores"] + cached["negative_scores"] == pytest.approx(
            plain["positive_scores"] + plain["negative_scores"], abs=1e-5
        )

    def no_encoding(*args, **kwargs):
        raise AssertionError("encoded although every text is in the cache")

    monkeypatch.setattr(tiny_model, "encode_query", no_encoding)
    monkeypatch.setattr(tiny_model, "encode_document", no_encoding)
    monkeypatch.setattr(tiny_model, "encode", no_encoding)
    again = score_records(RECORDS, tiny_model, cache_dir=cache, show_progress_bar=False)
    assert [r["positive_scores"] for r in again.records] == [r["positive_scores"] for r in first.records]


def test_a_cross_encoder_teacher_refuses_a_cache(cross_encoder_path, tmp_path):
    with pytest.raises(ValueError, match="`cache_dir` applies to bi-encoder teachers"):
        score_records(RECORDS, CrossEncoder(str(cross_encoder_path)), cache_dir=tmp_path / "cache")
