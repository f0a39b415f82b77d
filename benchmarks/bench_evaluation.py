"""Evaluation overhead: evaluate_model (mteb, no cache) vs. raw ``model.encode`` of exactly the texts it encodes.

Baseline, measured in the same run: the texts mteb embeds for the task (STS: sentence1 then sentence2; retrieval:
the queries with ``encode_query`` and the passages as "title text" with ``encode_document``), encoded with the same
batch size. The evaluation adds mteb's data loaders, similarity search, metric computation and result objects.
Medians of ``--repeats`` interleaved runs after one warm-up run; the target is <= 10% overhead. On a shared CPU the
difference of two wall times is noisy, so the time evaluate_model spends outside ``model.encode`` (measured inside
the same run) is reported too: that is the overhead proper.

    python benchmarks/bench_evaluation.py --data-dir ../shared/data/eval
    python benchmarks/bench_evaluation.py --main-job   # also time the README main job (python benchmarks/run_mteb.py)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from codiemb_st.shared_data import shared_data_path
from measurement.timing import MethodClock, timed

REPO_ROOT = Path(__file__).resolve().parents[1]


def raw_encode(model, prepared, batch_size: int) -> int:
    """Encode the texts the task's evaluation encodes; returns how many."""
    data = prepared.task.dataset["default"][prepared.split]
    if prepared.type == "sts":
        model.encode(data["sentence1"], batch_size=batch_size)
        model.encode(data["sentence2"], batch_size=batch_size)
        return 2 * len(data)
    queries = data["queries"]["text"]
    passages = [f"{title} {text}".strip() for title, text in zip(data["corpus"]["title"], data["corpus"]["text"])]
    model.encode_query(queries, batch_size=batch_size)
    model.encode_document(passages, batch_size=batch_size)
    return len(queries) + len(passages)


def row(raw: float, full: float, outside: float) -> str:
    return f"{raw:>9.2f} {full:>10.2f} {full / raw - 1:>+8.1%} {outside:>16.2f} {outside / raw:>+9.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, default=shared_data_path("eval"))
    parser.add_argument("--model", default=None, help="default: the packaged all-MiniLM-L6-v2")
    parser.add_argument("--tasks", nargs="+", default=["STSBenchmark", "SciFact"])
    parser.add_argument("--corpus-cap", type=int, default=300, help="retrieval corpus cap (default 300)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--main-job", action="store_true", help="also time `python benchmarks/run_mteb.py`")
    args = parser.parse_args()

    import torch
    from sentence_transformers import SentenceTransformer

    from codiemb_st.evaluation import evaluate_model, prepare_task

    if args.model is None:
        from codiemb_st.default_model import default_model_path

        args.model = default_model_path()
    model = SentenceTransformer(args.model, device="cpu")
    print(f"model {args.model}; torch threads {torch.get_num_threads()}; batch size {args.batch_size}")
    clock = MethodClock(model, "encode")  # encode_query / encode_document call encode too
    header = f"{'task':<14} {'texts':>6} {'prepare s':>9} {'encode s':>9} {'evaluate s':>10} {'ratio-1':>8}"
    print(header + f" {'outside encode s':>16} {'overhead':>9}")
    totals = [0.0, 0.0, 0.0]
    for name in args.tasks:
        prepare_time = time.perf_counter()
        prepared = prepare_task(name, data_dir=args.data_dir, corpus_cap=args.corpus_cap)
        prepare_time = time.perf_counter() - prepare_time
        n_texts = raw_encode(model, prepared, args.batch_size)  # warm-up
        evaluate_model(model, [prepared], batch_size=args.batch_size)
        raw, full, outside = [], [], []
        for _ in range(args.repeats):
            raw.append(timed(lambda: raw_encode(model, prepared, args.batch_size)))  # noqa: B023
            clock.seconds = 0.0
            full.append(timed(lambda: evaluate_model(model, [prepared], batch_size=args.batch_size)))  # noqa: B023
            outside.append(full[-1] - clock.seconds)
        medians = [statistics.median(raw), statistics.median(full), statistics.median(outside)]
        totals = [total + median for total, median in zip(totals, medians)]
        print(f"{name:<14} {n_texts:>6} {prepare_time:>9.2f} " + row(*medians))
    print(f"{'total':<14} {'':>6} {'':>9} " + row(*totals))

    if args.main_job:
        command = [sys.executable, str(REPO_ROOT / "benchmarks" / "run_mteb.py"), "--data-dir", str(args.data_dir)]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
        }
        seconds = timed(lambda: subprocess.run(command, cwd=REPO_ROOT, env=env, check=True))
        print(f"main job `python benchmarks/run_mteb.py`: {seconds:.0f} s wall")


if __name__ == "__main__":
    main()
