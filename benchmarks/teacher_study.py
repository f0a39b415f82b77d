"""Which teacher lever moves out-of-domain IR without costing STS? (issue 30, the mining study's protocol, en track)

IR trains on en_snli only (so SciFact, a scientific-claims retrieval test set no training file covers, is out of
domain; dev-ir, records held out of en_snli, is in domain), STS on en_stsb; all-MiniLM-L6-v2; equal updates;
several seeds; claims paired by seed under the project's rule. Variants (each a call of
benchmarks/reproduce_codiemb.py with ``--runs ir_only codiemb`` into its own folder):

- ``plain``:      the official CoDiEmb IR loss (en_snli's own negative);
- ``distill``:    + distillation from teacher scores (``distillation_weight`` = ``--distill-weight``, 2500: the KL
                  term is scaled by student_temperature^2 = 0.02^2; scores of every positive and negative by
                  ``--teacher``, written into a copy of en_snli with the same records in the same order, so the dev
                  hold-out is the same); ``distill_w1``: the same at weight 1 (the term vanishes: a finding);
- ``guide``:      + guide-model false-negative masking (``--guide``, margin 0);
- ``both``:       distillation and the guide;
- ``directions``: query->doc + query->query + doc->doc (GTE's improved contrastive loss);
- ``hardness``:   hardness weighting of all negatives, strength 5 (EmbeddingGemma);
- ``st_baseline`` (run once, on the plain data): what a sentence-transformers user writes today:
  MultipleNegativesRankingLoss + CoSENTLoss with the PROPORTIONAL sampler, the same budget as CoDiEmb.

Usage (the committed results; ~25 minutes per variant on this 2-core CPU):
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/teacher_study.py --seeds 42 43 44 --max-steps 40 \\
        --teacher TEACHER_FOLDER --guide GUIDE_FOLDER --output-dir runs/teacher_study \\
        --results-dir benchmarks/results/teacher_study
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

from codiemb_st.evaluation.seed_statistics import RULE, describe_task_comparison
from codiemb_st.file_io import write_atomic, write_json_atomic, write_text_atomic
from codiemb_st.shared_data import find_shared_data

VARIANTS = ("plain", "distill", "distill_w1", "guide", "both", "directions", "hardness", "st_baseline")
TASKS = (
    ("SciFact", "SciFact (test, out of domain)"),
    ("STSBenchmark", "STSBenchmark (test)"),
    ("dev-ir", "dev-ir (en_snli held out, in domain)"),
    ("dev-en_stsb", "dev-en_stsb (held out, in domain)"),
)


def score_file(source: Path, target: Path, teacher_path: str, batch_size: int = 64) -> None:
    """A copy of ``source`` with ``positive_scores``/``negative_scores`` from the teacher (same records, same order)."""
    from codiemb_st.scoring import load_teacher, score_pairs

    if target.is_file():
        return
    teacher = load_teacher(teacher_path, device="cpu")
    teacher.max_seq_length = 128
    with gzip.open(source, "rt", encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle if line.strip()]
    queries, texts = [], []
    for record in records:
        for text in record["positives"] + record.get("negatives", []):
            queries.append(record["query"])
            texts.append(text)
    scores = []
    for start in range(0, len(queries), 4096):  # chunks, for a sign of life on a slow CPU
        scores += score_pairs(
            teacher, queries[start : start + 4096], texts[start : start + 4096], batch_size=batch_size
        )
        print(f"scored {len(scores)} of {len(queries)} pairs", file=sys.stderr, flush=True)
    offset = 0
    for record in records:
        count, total = len(record["positives"]), len(record["positives"]) + len(record.get("negatives", []))
        record["positive_scores"] = scores[offset : offset + count]
        record["negative_scores"] = scores[offset + count : offset + total]
        offset += total

    def write(tmp: Path) -> None:
        with gzip.open(tmp, "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)

    write_atomic(target, write)


def variant_command(variant: str, args: argparse.Namespace, snli: Path, scored: Path, stsb: Path) -> list[str]:
    distill = ["--ir-loss-option", f"distillation_weight={args.distill_weight}"]
    distill += ["--ir-loss-option", f"teacher_temperature={args.teacher_temperature}"]
    guide = ["--guide", str(args.guide)]
    ir_file, runs, extra = {
        "plain": (snli, ["ir_only", "codiemb"], []),
        "distill": (scored, ["ir_only", "codiemb"], distill),
        "distill_w1": (scored, ["ir_only", "codiemb"], ["--ir-loss-option", "distillation_weight=1", *distill[2:]]),
        "guide": (snli, ["ir_only", "codiemb"], guide),
        "both": (scored, ["ir_only", "codiemb"], distill + guide),
        "directions": (
            snli,
            ["ir_only", "codiemb"],
            ["--ir-loss-option", "directions=query_to_doc,query_to_query,doc_to_doc"],
        ),
        "hardness": (
            snli,
            ["ir_only", "codiemb"],
            ["--ir-loss-option", "hardness_mode=all_negatives", "--ir-loss-option", "hardness_strength=5"],
        ),
        "st_baseline": (snli, ["st_baseline"], ["--ablation-seeds", str(len(args.seeds))]),
    }[variant]
    script = Path(__file__).resolve().parent / "reproduce_codiemb.py"
    command = [sys.executable, str(script), "--track", "en", "--runs", *runs]
    command += ["--ir-files", str(ir_file), "--sts-files", str(stsb), "--num-negatives", "1"]
    command += ["--seeds", *map(str, args.seeds), "--max-steps", str(args.max_steps), *extra]
    command += ["--output-dir", str(args.output_dir / variant), "--results-dir", str(args.results_dir / variant)]
    return command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44])
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--teacher", default=None, help="teacher model folder (cross-encoder or bi-encoder)")
    parser.add_argument(
        "--teacher-temperature",
        type=float,
        default=0.02,
        help="teacher temperature (0.02: a bi-encoder's cosines on the student's scale; ~1 for cross-encoder logits)",
    )
    parser.add_argument(
        "--distill-weight",
        type=float,
        default=2500.0,
        help="distillation weight; the KL term is scaled by student_temperature^2 (DistillKLDivLoss' convention), "
        "0.02^2 = 1/2500 at the loss's temperature, so 2500 gives it the weight of the InfoNCE term (1 made it "
        "vanish: the distill_w1 results)",
    )
    parser.add_argument("--guide", default=None, help="guide model folder (a SentenceTransformer)")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/teacher_study"))
    parser.add_argument("--results-dir", type=Path, default=Path("benchmarks/results/teacher_study"))
    parser.add_argument("--summarize-only", action="store_true", help="rewrite the summary from the variants' results")
    args = parser.parse_args()
    if args.summarize_only:
        summarize(args)
        return
    needs = {"distill": "teacher", "both": "teacher"}
    for variant in args.variants:
        if needs.get(variant) == "teacher" and not args.teacher:
            raise SystemExit(f"--variants {variant} needs --teacher.")
        if variant in ("guide", "both") and not args.guide:
            raise SystemExit(f"--variants {variant} needs --guide.")
    shared = find_shared_data()
    if shared is None:
        raise SystemExit("No shared/data folder found (set CODIEMB_SHARED_DATA).")
    snli, stsb = shared / "train" / "en_snli.jsonl.gz", shared / "train" / "en_stsb.jsonl.gz"
    scored = args.output_dir / "data" / "en_snli.jsonl.gz"  # same name: same dataset name and dev split
    if args.teacher and {"distill", "both"} & set(args.variants):
        score_file(snli, scored, args.teacher)
    for variant in args.variants:
        command = variant_command(variant, args, snli, scored, stsb)
        print(" ".join(command), file=sys.stderr, flush=True)
        subprocess.run(command, check=True, env=os.environ.copy())
        summarize(args)


def _scores(args: argparse.Namespace) -> dict[str, dict]:
    results = {}
    for variant in VARIANTS:
        path = args.results_dir / variant / "en" / "results.json"
        if path.is_file():
            results[variant] = json.loads(path.read_text())["scores"]
    return results


def summarize(args: argparse.Namespace) -> None:
    results = _scores(args)
    lines = [
        "# Teacher study (REDUCED: en track, IR = en_snli only, STS = en_stsb)",
        "",
        f"Seeds {args.seeds}, {args.max_steps} optimizer steps per task (ir_only {args.max_steps}, codiemb and "
        f"st_baseline {2 * args.max_steps}), this 2-core CPU, all-MiniLM-L6-v2. Teacher: `{args.teacher}`, guide: "
        f"`{args.guide}`. Main scores x100, mean over seeds; per-variant tables in `<variant>/en/results.md`.",
        "",
        "| task | run | " + " | ".join(results) + " |",
        "|---|---|" + "---:|" * len(results),
    ]
    for task, label in TASKS:
        for run in ("base", "ir_only", "codiemb", "st_baseline"):
            cells = []
            for variant in results:
                values = [scores[task] for scores in results[variant].get(run, {}).values() if task in scores]
                cells.append(f"{100 * sum(values) / len(values):.2f}" if values else "-")
            if any(cell != "-" for cell in cells):
                lines.append(f"| {label} | {run} | " + " | ".join(cells) + " |")
    lines += ["", f"Claim rule: {RULE}", "", "## Each lever against plain, paired by seed", ""]
    summary: dict[str, object] = {"variants": list(results), "comparisons": {}}
    for task, label in TASKS:
        for run in ("ir_only", "codiemb"):
            for variant in results:
                if variant in ("plain", "st_baseline") or "plain" not in results:
                    continue
                text = describe_task_comparison(results[variant].get(run, {}), results["plain"].get(run, {}), task)
                summary["comparisons"][f"{task}:{run}:{variant}-plain"] = text  # type: ignore[index]
                lines.append(f"- {label}, {run}: {variant} vs plain: {text}")
        if "st_baseline" in results and "plain" in results:
            text = describe_task_comparison(
                results["plain"].get("codiemb", {}), results["st_baseline"].get("st_baseline", {}), task
            )
            summary["comparisons"][f"{task}:codiemb-st_baseline"] = text  # type: ignore[index]
            lines.append(f"- {label}: CoDiEmb (plain) vs the sentence-transformers baseline: {text}")
    write_text_atomic(args.results_dir / "results.md", "\n".join(lines) + "\n")
    write_json_atomic(args.results_dir / "results.json", summary)


if __name__ == "__main__":
    main()
