"""Mining at scale: the embedding cache (reuse, keys, damage, kill -9 and resume), teacher scores out, cross-encoder
re-scoring, faiss (exact = dense), torchrun shards (2 ranks = 1 process) and the multi-process pool."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from kill_harness import kill_when_signalled
from tiny_model import ENGLISH_SENTENCES, build_tiny_model

from codiemb_st.cli import main
from codiemb_st.mining import mine_hard_negatives, write_ir_records
from codiemb_st.mining.cache import embed_texts, encoder_fingerprint

REPO_ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over lazy dog a man is playing guitar on stage woman slicing onion".split()


def _text(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length)) + f" {i}"


# Two positives a query (the multi-positive case) and 40 extra passages.
RECORDS = [
    {"query": query, "positives": [ENGLISH_SENTENCES[(i + 1) % 10], ENGLISH_SENTENCES[(i + 2) % 10]]}
    for i, query in enumerate(ENGLISH_SENTENCES)
]
PASSAGES = [_text(i, 6) for i in range(40)]
# The tiny random model scores everything alike: no margin, so that every query gets its negatives.
OPTIONS = {"num_negatives": 3, "corpus": [PASSAGES], "margin": None, "range_min": 1, "show_progress_bar": False}


def _negatives(records) -> list[list[str]]:
    return [record["negatives"] for record in records.records]


def _count_encodes(monkeypatch, model) -> list[int]:
    """Record the number of texts of every encode call of ``model``."""
    calls: list[int] = []
    real = model.encode

    def encode(inputs, *args, **kwargs):
        calls.append(len(inputs))
        return real(inputs, *args, **kwargs)

    monkeypatch.setattr(model, "encode", encode)
    return calls


# ---------------------------------------------------------------------------------------------------------------------
# (1) The embedding cache


def test_cache_gives_the_uncached_negatives_and_a_second_call_encodes_nothing(tiny_model, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    plain, _ = mine_hard_negatives(RECORDS, tiny_model, **OPTIONS)
    first, _ = mine_hard_negatives(RECORDS, tiny_model, cache_dir=cache, cache_shard_size=16, **OPTIONS)
    assert _negatives(first) == _negatives(plain)  # float32 cache: the same negatives as no cache
    folders = list(cache.iterdir())
    assert len(folders) == 1 and (folders[0] / "encoder.json").is_file()
    # 50 corpus texts in shards of 16 (4 shards) + 10 queries (1 shard), three files each.
    assert len(list(folders[0].glob("*.json"))) == 1 + 5 and len(list(folders[0].glob("*.ids.npy"))) == 5

    # Another window, margin, sampling and N: everything comes from the cache, nothing is encoded or tokenized.
    calls = _count_encodes(monkeypatch, tiny_model)
    monkeypatch.setattr(tiny_model, "preprocess", lambda *a, **k: pytest.fail("tokenized a cached text"))
    options = {**OPTIONS, "num_negatives": 2, "range_min": 3, "sampling": "top", "margin": 0.5}
    again, _ = mine_hard_negatives(RECORDS, tiny_model, cache_dir=cache, cache_shard_size=16, **options)
    assert calls == []
    monkeypatch.undo()
    reference, _ = mine_hard_negatives(RECORDS, tiny_model, **options)
    assert _negatives(again) == _negatives(reference)


def test_cache_keys_model_content_prompt_and_max_seq_length(tiny_model, tmp_path):
    cache = tmp_path / "cache"
    texts = PASSAGES[:20]
    embed_texts(tiny_model, texts, side="document", cache_dir=cache, show_progress_bar=False)
    shards = lambda: sorted(p.name for p in cache.rglob("*.npy"))  # noqa: E731
    before = shards()
    embed_texts(tiny_model, texts, side="document", cache_dir=cache, show_progress_bar=False)
    assert shards() == before  # reused
    embed_texts(tiny_model, texts, side="document", prompt="passage: ", cache_dir=cache, show_progress_bar=False)
    assert len(shards()) == len(before) + 2  # another prompt: another shard (embeddings + identities)
    other = build_tiny_model(seed=1)  # same architecture and tokenizer, other weights
    assert encoder_fingerprint(other) != encoder_fingerprint(tiny_model)
    fingerprint = encoder_fingerprint(tiny_model)
    tiny_model.max_seq_length = 8
    assert encoder_fingerprint(tiny_model) != fingerprint
    store = embed_texts(tiny_model, texts, side="document", cache_dir=cache, show_progress_bar=False)
    assert len(list(cache.iterdir())) == 2  # another max_seq_length: another encoder folder
    assert isinstance(store.shards[0], np.memmap)  # read memory-mapped
    half = embed_texts(tiny_model, texts, side="document", cache_dir=cache, cache_dtype="float16")
    assert half.shards[0].dtype == np.float16
    assert np.abs(half.rows(range(20)) - store.rows(range(20))).max() < 1e-3


def test_a_damaged_shard_is_warned_about_and_encoded_again(tiny_model, tmp_path, caplog):
    cache = tmp_path / "cache"
    reference, _ = mine_hard_negatives(RECORDS, tiny_model, cache_dir=cache, cache_shard_size=16, **OPTIONS)
    shard = next(p for p in sorted(cache.rglob("document-*.npy")) if not p.name.endswith(".ids.npy"))
    data = bytearray(shard.read_bytes())
    data[-4:] = b"\x00\x00\xc0\x7f"  # one float becomes NaN: same length, another checksum
    shard.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again, _ = mine_hard_negatives(RECORDS, tiny_model, cache_dir=cache, cache_shard_size=16, **OPTIONS)
    assert "is damaged (embeddings checksum mismatch): encoding it again" in caplog.text
    assert _negatives(again) == _negatives(reference)
    # A record file without its arrays (a crash between writes on another filesystem) counts as damaged too.
    shard.unlink()
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        mine_hard_negatives(RECORDS, tiny_model, cache_dir=cache, cache_shard_size=16, **OPTIONS)
    assert "is damaged (unreadable" in caplog.text


# Mines through the command line with a cache of 4-text shards, but stalls (after touching a signal file) once the
# third shard has been encoded, to be killed there.
_KILLED_ENCODE = """
import sys, time
from pathlib import Path
from sentence_transformers import SentenceTransformer
argv, signal_file = sys.argv[1:-1], sys.argv[-1]
real_encode = SentenceTransformer.encode
calls = []
def encode_then_stall(self, inputs, *args, **kwargs):
    if len(calls) == 3:
        Path(signal_file).touch()
        time.sleep(600)
    calls.append(len(inputs))
    return real_encode(self, inputs, *args, **kwargs)
SentenceTransformer.encode = encode_then_stall
from codiemb_st.cli import main
main(argv)
"""


def test_mine_killed_mid_encode_resumes_from_the_cache_with_the_same_output(tiny_model_path, tmp_path, monkeypatch):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(text + "\n" for text in PASSAGES))
    cache, out, signal_file = tmp_path / "cache", tmp_path / "mined.jsonl", tmp_path / "encoding"
    argv = [str(source), "--corpus", str(corpus), "--model", str(tiny_model_path), "--num-negatives", "2"]
    argv += ["--no-margin", "--cache-dir", str(cache), "--cache-shard-size", "4"]
    command = [sys.executable, "-c", _KILLED_ENCODE, "mine", *argv, "--output", str(out), str(signal_file)]
    kill_when_signalled(command, signal_file, "started encoding")
    assert not out.exists()
    written = sorted(cache.rglob("document-*.json"))
    assert len(written) == 3  # three complete shards (of 13), nothing half-written is counted

    # The rerun encodes only the 10 missing shards (+ 3 of queries) and writes what an uninterrupted run writes.
    from sentence_transformers import SentenceTransformer

    calls: list[int] = []
    real_encode = SentenceTransformer.encode

    def counting(self, inputs, *args, **kwargs):
        calls.append(len(inputs))
        return real_encode(self, inputs, *args, **kwargs)

    monkeypatch.setattr(SentenceTransformer, "encode", counting)
    assert main(["mine", *argv, "--output", str(out)]) == 0
    assert len(calls) == 13 - 3 + 3
    monkeypatch.undo()
    reference = tmp_path / "reference.jsonl"
    # No cache at all (the same shards in memory).
    assert main(["mine", *argv[:-4], "--cache-shard-size", "4", "--output", str(reference)]) == 0
    assert out.read_text() == reference.read_text() and len(out.read_text().splitlines()) == 10


# ---------------------------------------------------------------------------------------------------------------------
# (2) Scores out and cross-encoder re-scoring


@pytest.fixture(scope="module")
def tiny_cross_encoder(tmp_path_factory):
    """A random tiny BERT cross-encoder (one score a pair), saved and loaded offline."""
    from sentence_transformers import CrossEncoder
    from tiny_model import save_tiny_cross_encoder

    # A random head scores every pair about alike: spread the scores.
    path = save_tiny_cross_encoder(tmp_path_factory.mktemp("cross_encoder") / "model", num_layers=2, head_scale=50)
    return CrossEncoder(str(path), device="cpu")


def _cosines(model, query: str, texts: list[str]) -> np.ndarray:
    vectors = model.encode([query, *texts], normalize_embeddings=True, convert_to_numpy=True)
    return vectors[1:] @ vectors[0]


def test_output_scores_are_the_bi_encoders_cosines_in_every_format(tiny_model, tmp_path):
    mined, _ = mine_hard_negatives(RECORDS, tiny_model, output_scores=True, **OPTIONS)
    for record in mined.records:
        assert len(record["positive_scores"]) == 2 and len(record["negative_scores"]) == 3
        np.testing.assert_allclose(
            record["positive_scores"], _cosines(tiny_model, record["query"], record["positives"]), atol=1e-5
        )
        np.testing.assert_allclose(
            record["negative_scores"], _cosines(tiny_model, record["query"], record["negatives"]), atol=1e-5
        )
    row = json.loads(write_ir_records(mined, tmp_path / "unified.jsonl").read_text().splitlines()[0])
    assert row["positive_scores"] == mined.records[0]["positive_scores"] and len(row["negative_scores"]) == 3
    flag = [{"query": r["query"], "pos": r["positives"]} for r in RECORDS]
    mined_flag, _ = mine_hard_negatives(flag, tiny_model, output_scores=True, **OPTIONS)
    row = json.loads(write_ir_records(mined_flag, tmp_path / "flag.jsonl").read_text().splitlines()[0])
    assert set(row) == {"query", "pos", "neg", "pos_scores", "neg_scores"} and len(row["neg_scores"]) == 3
    # sentence-transformers rows (one positive a row): label = [that row's positive score, negative scores...].
    st_rows = [{"anchor": r["query"], "positive": p} for r in RECORDS for p in r["positives"]]
    mined_st, _ = mine_hard_negatives(st_rows, tiny_model, output_scores=True, **OPTIONS)
    from datasets import Dataset

    table = Dataset.from_parquet(str(write_ir_records(mined_st, tmp_path / "st.parquet")))
    assert table.column_names == ["anchor", "positive", "negative_1", "negative_2", "negative_3", "label"]
    first = mined_st.records[0]
    for p in range(2):
        assert table[p]["label"] == pytest.approx([first["positive_scores"][p], *first["negative_scores"]])


def test_input_scores_are_kept_for_kept_texts_and_dropped_with_a_warning_otherwise(tiny_model, caplog):
    scored = [
        {
            **record,
            "negatives": PASSAGES[10 * i : 10 * i + 3],
            "positive_scores": [0.9, 0.8],
            "negative_scores": [0.3, 0.2, 0.1],
        }
        for i, record in enumerate(RECORDS[:4])
    ]
    # Every record keeps its three own negatives: their input scores stay, aligned.
    kept, stats = mine_hard_negatives(scored, tiny_model, keep_negatives=True, **OPTIONS)
    assert stats.scores_dropped == 0
    assert [r["negative_scores"] for r in kept.records] == [[0.3, 0.2, 0.1]] * 4
    assert [r["positive_scores"] for r in kept.records] == [[0.9, 0.8]] * 4
    # Mined negatives have no input score: no negative_scores (never a misaligned list), positives keep theirs.
    with caplog.at_level(logging.WARNING):
        mined, stats = mine_hard_negatives(scored, tiny_model, **OPTIONS)
    assert stats.scores_dropped == 4 and "4 records had negative_scores" in caplog.text
    assert all(r["negative_scores"] is None and r["positive_scores"] == [0.9, 0.8] for r in mined.records)


def test_misaligned_scores_are_refused_when_written(tiny_model, tmp_path):
    mined, _ = mine_hard_negatives(RECORDS, tiny_model, output_scores=True, **OPTIONS)
    mined.records[3]["negative_scores"] = [0.5]
    with pytest.raises(ValueError, match=r"row 3: 1 negative_scores for 3 negatives; the scores must be aligned"):
        write_ir_records(mined, tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_cross_encoder_rescores_ranks_and_filters_the_candidates(tiny_model, tiny_cross_encoder):
    # A window wider than the corpus: every allowed text is a candidate, so "top" must be the cross-encoder's top 3.
    options = {**OPTIONS, "range_min": 0, "range_max": 100, "sampling": "top"}
    mined, _ = mine_hard_negatives(
        RECORDS, tiny_model, cross_encoder=tiny_cross_encoder, output_scores=True, **options
    )
    corpus = list(dict.fromkeys([p for r in RECORDS for p in r["positives"]] + PASSAGES))
    for record in mined.records:
        allowed = [text for text in corpus if text != record["query"] and text not in record["positives"]]
        scores = tiny_cross_encoder.predict([(record["query"], text) for text in allowed])
        best = [allowed[k] for k in np.argsort(-scores, kind="stable")[:3]]
        assert record["negatives"] == best
        np.testing.assert_allclose(record["negative_scores"], np.sort(scores)[::-1][:3], rtol=1e-5)
        positives = tiny_cross_encoder.predict([(record["query"], text) for text in record["positives"]])
        np.testing.assert_allclose(record["positive_scores"], positives, rtol=1e-5)
    # The margin applies to the cross-encoder's scores: no negative above (1 - margin) x the lowest positive's.
    margin = {**options, "margin": 0.01}
    filtered, stats = mine_hard_negatives(
        RECORDS, tiny_model, cross_encoder=tiny_cross_encoder, output_scores=True, **margin
    )
    assert stats.skipped_margin > 0
    for record in filtered.records:
        lowest = min(record["positive_scores"])
        assert all(score <= lowest - abs(lowest) * 0.01 + 1e-6 for score in record["negative_scores"])
    with pytest.raises(TypeError, match="`cross_encoder` must be a sentence_transformers.CrossEncoder"):
        mine_hard_negatives(RECORDS, tiny_model, cross_encoder=object(), **OPTIONS)


def test_mine_command_cross_encoder_and_output_scores(tiny_model_path, tiny_cross_encoder, tmp_path, capsys):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps({"query": r["query"], "pos": r["positives"]}) + "\n" for r in RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(text + "\n" for text in PASSAGES))
    tiny_cross_encoder.save(str(tmp_path / "ce"))
    out = tmp_path / "mined.jsonl"
    argv = ["mine", str(source), "--corpus", str(corpus), "--model", str(tiny_model_path), "--num-negatives", "2"]
    argv += ["--no-margin", "--cross-encoder", str(tmp_path / "ce"), "--output-scores", "--output", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(len(row["neg_scores"]) == 2 and len(row["pos_scores"]) == 2 for row in rows)
    assert all(0.0 <= score <= 1.0 for row in rows for score in row["neg_scores"])  # the cross-encoder's sigmoid


# ---------------------------------------------------------------------------------------------------------------------
# (3) faiss: exact flat search = the dense search; approximate indexes with every cell visited = exact


@pytest.mark.parametrize("sampling", ["top", "random"])
def test_faiss_flat_gives_exactly_the_dense_negatives(tiny_model, tmp_path, sampling):
    import faiss  # noqa: F401  (the dev extra installs faiss-cpu: a missing faiss fails this test, never skips it)

    options = {**OPTIONS, "sampling": sampling, "output_scores": True, "cache_dir": tmp_path / "cache"}
    dense, _ = mine_hard_negatives(RECORDS, tiny_model, **options)
    flat, _ = mine_hard_negatives(RECORDS, tiny_model, index="flat", **options)
    assert _negatives(flat) == _negatives(dense)
    for a, b in zip(flat.records, dense.records):
        np.testing.assert_allclose(a["negative_scores"], b["negative_scores"], atol=1e-6)
    # The margin and the identity rule hold the same way (a margin that removes candidates, a deeper search).
    margin = {**options, "margin": 0.001, "range_max": 4, "range_min": 0}
    dense, dense_stats = mine_hard_negatives(RECORDS, tiny_model, **margin)
    flat, flat_stats = mine_hard_negatives(RECORDS, tiny_model, index="flat", **margin)
    assert _negatives(flat) == _negatives(dense) and flat_stats.skipped_margin == dense_stats.skipped_margin > 0


def test_ivf_visiting_every_cell_and_hnsw_find_the_exact_negatives(tiny_model, tmp_path):
    from codiemb_st.mining import IndexOptions

    options = {**OPTIONS, "sampling": "top", "cache_dir": tmp_path / "cache"}
    exact, _ = mine_hard_negatives(RECORDS, tiny_model, **options)
    ivf, _ = mine_hard_negatives(
        RECORDS, tiny_model, index="ivf", index_options=IndexOptions(nlist=4, nprobe=4), **options
    )
    assert _negatives(ivf) == _negatives(exact)
    hnsw, _ = mine_hard_negatives(RECORDS, tiny_model, index="hnsw", **options)
    assert _negatives(hnsw) == _negatives(exact)  # 50 texts, ef_search 256: the graph search is exhaustive here


def test_without_faiss_the_package_imports_and_faiss_indexes_say_how_to_install(tiny_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    code = "import codiemb_st, codiemb_st.mining, codiemb_st.cli; print('ok')"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    blocker = "import sys; sys.modules['faiss'] = None; "
    assert (
        subprocess.run([sys.executable, "-c", blocker + code], env=env, capture_output=True, text=True).stdout
        == "ok\n"
    )
    with pytest.raises(ImportError, match=r'pip install "codiemb-st\[faiss\]"'):
        mine_hard_negatives(RECORDS, tiny_model, index="flat", **OPTIONS)


# ---------------------------------------------------------------------------------------------------------------------
# (4) torchrun shards and the multi-process pool

_WORKER = """
import sys
from codiemb_st.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.distributed
def test_two_torchrun_ranks_write_byte_identical_output_to_one_process(tiny_model_path, tmp_path):
    from torchrun_harness import run_torchrun

    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(text + "\n" for text in PASSAGES))
    # Shards of 8 texts and chunks of 3 queries: both ranks encode shards and search chunks.
    argv = ["mine", str(source), "--corpus", str(corpus), "--model", str(tiny_model_path), "--num-negatives", "3"]
    argv += [
        "--range-min",
        "1",
        "--no-margin",
        "--output-scores",
        "--cache-shard-size",
        "8",
        "--query-chunk-size",
        "3",
    ]
    worker = tmp_path / "worker.py"
    worker.write_text(_WORKER)
    two, one = tmp_path / "two_ranks.jsonl", tmp_path / "one_process.jsonl"
    # One process launched the same way (the same environment, one thread), so that only the number of ranks differs.
    for output, cache, nproc in ((two, "cache2", 2), (one, "cache1", 1)):
        args = [*argv, "--cache-dir", str(tmp_path / cache), "--output", str(output)]
        result = run_torchrun(worker, args, tmp_path / f"log{nproc}", timeout=400, nproc=nproc)
        assert result.returncode == 0, result.stdout[-4000:]
        assert result.stdout.count(f"Mined {output}:") == 1  # rank 0 alone writes and reports
    assert two.read_bytes() == one.read_bytes()
    # Both ranks wrote shards of the shared cache: the same files as one process's cache.
    names = lambda folder: sorted(p.name for p in folder.rglob("*") if p.is_file())  # noqa: E731
    assert names(tmp_path / "cache2") == names(tmp_path / "cache1")


def test_torchrun_without_a_cache_dir_is_refused(tiny_model, monkeypatch):
    from codiemb_st.mining.distributed import RankContext

    monkeypatch.setattr(RankContext, "current", classmethod(lambda cls, distributed=None: cls(0, 2)))
    with pytest.raises(
        ValueError, match="Mining on 2 ranks shares the embeddings through the cache: give `cache_dir`"
    ):
        mine_hard_negatives(RECORDS, tiny_model, **OPTIONS)


def test_multi_process_pool_with_two_cpu_processes_gives_the_same_negatives(tiny_model, tmp_path):
    options = {**OPTIONS, "sampling": "top", "output_scores": True}
    single, _ = mine_hard_negatives(RECORDS, tiny_model, **options)
    pooled, _ = mine_hard_negatives(RECORDS, tiny_model, use_multi_process=["cpu", "cpu"], **options)
    assert _negatives(pooled) == _negatives(single)
    for a, b in zip(pooled.records, single.records):
        np.testing.assert_allclose(a["negative_scores"], b["negative_scores"], atol=1e-5)
    # With a cache, a second call finds every shard and starts no pool at all.
    cache = tmp_path / "cache"
    mine_hard_negatives(RECORDS, tiny_model, cache_dir=cache, use_multi_process=["cpu", "cpu"], **options)
    again, _ = mine_hard_negatives(
        RECORDS, tiny_model, cache_dir=cache, use_multi_process=["no-such-device"], **options
    )
    assert _negatives(again) == _negatives(pooled)


def test_mine_command_faiss_equals_dense_and_the_cache_is_never_written_into_an_input(
    tiny_model_path, tmp_path, capsys
):
    source = tmp_path / "pairs.jsonl"
    source.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(text + "\n" for text in PASSAGES))
    argv = ["mine", str(source), "--corpus", str(corpus), "--model", str(tiny_model_path), "--no-margin"]
    argv += ["--cache-dir", str(tmp_path / "cache")]
    assert main([*argv, "--output", str(tmp_path / "dense.jsonl")]) == 0
    assert main([*argv, "--faiss", "--output", str(tmp_path / "flat.jsonl")]) == 0
    assert (tmp_path / "flat.jsonl").read_text() == (tmp_path / "dense.jsonl").read_text()
    capsys.readouterr()
    inside_model = [*argv[:-2], "--cache-dir", str(tiny_model_path / "cache"), "--output", str(tmp_path / "o.jsonl")]
    assert main(inside_model) == 2
    assert "--cache-dir" in capsys.readouterr().err and not (tiny_model_path / "cache").exists()
