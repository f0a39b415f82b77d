"""Does mining help? IR-only and CoDiEmb trained with mined vs the data's own vs no hard negatives (en track).

A REDUCED study by default (labelled as such in its output): the IR side trains on en_snli only (its own negatives
are its contradiction hypotheses), the STS side on en_stsb, so SciFact (a scientific-claims retrieval test set no
training file covers) is out of domain for the IR data; dev-ir (records held out from en_snli) is in domain.

Variants (each a call of benchmarks/reproduce_codiemb.py with ``--runs ir_only codiemb`` into its own folder):

- ``none``:  en_snli without hard negatives (``--num-negatives 0``, in-batch negatives only);
- ``own``:   en_snli with its own negative (``--num-negatives 1``);
- ``mined``: en_snli with one mined negative instead (``codiemb_st.mining.mine_hard_negatives`` with the base model,
  all-MiniLM-L6-v2, corpus = the file's positives, window 2-200, margin 0.05, seed 0), ``--num-negatives 1``; the
  queries left without a negative by the window and margin (159 of 5,863) are mined again with range_min=0 and no
  margin (the recipe trains a file where any record lacks a negative with in-batch negatives only).

Every variant uses the same seeds, steps, batch sizes and evaluation (reproduce_codiemb.py's defaults for the en
track unless given). The summary pairs runs by seed with the project's claim rule. The mined file's corpus holds
the positives of the held-out dev records too (as negatives only).

Usage (reduced: 3 seeds, 40 steps per task; the committed results):
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/mining_study.py --seeds 42 43 44 --max-steps 40 \\
        --output-dir runs/mining_study --results-dir benchmarks/results/mining_study
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from codiemb_st.evaluation.seed_statistics import RULE, describe_task_comparison
from codiemb_st.file_io import write_json_atomic, write_text_atomic
from codiemb_st.shared_data import find_shared_data

VARIANTS = ("none", "own", "mined")
TASKS = (("SciFact", "SciFact (test, out of domain)"), ("dev-ir", "dev-ir (en_snli held out, in domain)"))
STS_TASKS = (("STSBenchmark", "STSBenchmark (test)"),)


def mine_file(source: Path, target: Path) -> None:
    from sentence_transformers import SentenceTransformer

    from codiemb_st.default_model import default_model_path
    from codiemb_st.mining import mine_hard_negatives, write_ir_records

    if target.is_file():
        return
    model = SentenceTransformer(default_model_path(), device="cpu")
    model.max_seq_length = 128
    mined, stats = mine_hard_negatives(source, model, num_negatives=1, batch_size=64, seed=0)
    print(f"mined {target}: {stats}", file=sys.stderr)
    fill_short(mined, model)
    write_ir_records(mined, target)


def fill_short(mined, model) -> None:  # noqa: ANN001
    """Queries the window and margin left without a negative are mined again with range_min=0 and no margin.

    The recipe trains a file with in-batch negatives only when any record lacks a negative, so every record needs
    one for the ``mined`` variant to differ from ``none``.
    """
    from dataclasses import replace

    from codiemb_st.mining import mine_hard_negatives

    short = [record for record in mined.records if not record["negatives"]]
    if not short:
        return
    corpus = [text for record in mined.records for text in record["positives"]]
    refilled, stats = mine_hard_negatives(
        replace(mined, records=short), model, num_negatives=1, corpus=[corpus], range_min=0, margin=None, seed=0
    )
    by_query = {record["query"]: record["negatives"] for record in refilled.records}
    for record in mined.records:
        if not record["negatives"]:
            record["negatives"] = by_query[record["query"]]
    print(f"re-mined {len(short)} queries without a negative (range_min=0, no margin): {stats}", file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43])
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--output-dir", type=Path, default=Path("runs/mining_study"))
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results/mining_study"))
    parser.add_argument("--summarize-only", action="store_true", help="rewrite the summary from the variants' results")
    args = parser.parse_args()
    if args.summarize_only:
        summarize(args)
        return
    shared = find_shared_data()
    if shared is None:
        raise SystemExit("No shared/data folder found (set CODIEMB_SHARED_DATA).")
    train = shared / "train"
    snli, stsb = train / "en_snli.jsonl.gz", train / "en_stsb.jsonl.gz"
    mined_file = args.output_dir / "data" / "en_snli.jsonl.gz"  # same name: same dataset name and dev split
    mined_file.parent.mkdir(parents=True, exist_ok=True)
    mine_file(snli, mined_file)
    script = Path(__file__).resolve().parent / "reproduce_codiemb.py"
    for variant in args.variants:
        ir_file, negatives = {"none": (snli, 0), "own": (snli, 1), "mined": (mined_file, 1)}[variant]
        command = [sys.executable, str(script), "--track", "en", "--runs", "ir_only", "codiemb"]
        command += ["--ir-files", str(ir_file), "--sts-files", str(stsb), "--num-negatives", str(negatives)]
        command += ["--seeds", *map(str, args.seeds), "--max-steps", str(args.max_steps)]
        command += ["--output-dir", str(args.output_dir / variant), "--results-dir", str(args.results_dir / variant)]
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True, env=os.environ.copy())
        summarize(args)


def summarize(args: argparse.Namespace) -> None:
    results = {}
    for variant in VARIANTS:
        path = args.results_dir / variant / "en" / "results.json"
        if path.is_file():
            results[variant] = json.loads(path.read_text())["scores"]
    lines = [
        "# Mining study (REDUCED: en track, IR = en_snli only, STS = en_stsb)",
        "",
        f"Seeds {args.seeds}, {args.max_steps} optimizer steps per task (ir_only {args.max_steps}, codiemb "
        f"{2 * args.max_steps}), this 2-core CPU shared with other jobs, all-MiniLM-L6-v2. Command: "
        f"`OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/mining_study.py --seeds {' '.join(map(str, args.seeds))} "
        f"--max-steps {args.max_steps}`. Main scores x100, mean over seeds; per-variant tables in "
        "`<variant>/en/results.md`.",
        "",
        "| task | run | " + " | ".join(v for v in VARIANTS if v in results) + " |",
        "|---|---|" + "---:|" * len(results),
    ]
    for task, label in (*TASKS, *STS_TASKS):
        for run in ("base", "ir_only", "codiemb"):
            cells = []
            for variant in VARIANTS:
                if variant not in results:
                    continue
                values = [scores[task] for scores in results[variant].get(run, {}).values() if task in scores]
                cells.append(f"{100 * sum(values) / len(values):.2f}" if values else "-")
            lines.append(f"| {label} | {run} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Note: reproduce_codiemb.py builds dev-ir from the records it holds out of the training file, its corpus being "
        "their positives AND negatives. In the `mined` variant those negatives are the mined ones (harder: base "
        "87.71 instead of 89.07), so dev-ir is a different, harder test set there: compare `mined` on dev-ir only "
        "within its column (CoDiEmb vs IR-only vs base), never across columns. SciFact and STSBenchmark are the same "
        "test sets in every column.",
        "",
        f"Claim rule: {RULE}",
        "",
    ]
    summary: dict[str, object] = {"variants": list(results), "comparisons": {}}
    for task, label in TASKS:
        for run in ("ir_only", "codiemb"):
            for a, b in (("mined", "own"), ("mined", "none"), ("own", "none")):
                if task == "dev-ir" and "mined" in (a, b):
                    continue  # another dev set (see the note below the table)
                if a in results and b in results:
                    text = describe_task_comparison(results[a].get(run, {}), results[b].get(run, {}), task)
                    summary["comparisons"][f"{task}:{run}:{a}-{b}"] = text  # type: ignore[index]
                    lines.append(f"- {label}, {run}: {a} vs {b}: {text}")
        # The gap the issue asks about: CoDiEmb - IR-only, per variant (negative = CoDiEmb below IR-only).
        for variant in results:
            gap = describe_task_comparison(
                results[variant].get("codiemb", {}), results[variant].get("ir_only", {}), task
            )
            summary["comparisons"][f"{task}:gap:{variant}"] = gap  # type: ignore[index]
            lines.append(f"- {label}: CoDiEmb - IR-only with {variant} negatives: {gap}")
    write_text_atomic(args.results_dir / "results.md", "\n".join(lines) + "\n")
    write_json_atomic(args.results_dir / "results.json", summary)


if __name__ == "__main__":
    main()
