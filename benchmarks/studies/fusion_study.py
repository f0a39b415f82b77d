"""The fusion study as a study: merge every checkpoint set with every grid row, pick settings on dev, report.

``benchmarks/fusion_study.py`` parses its command line and calls :func:`run_study`.

Example:
    >>> from studies.fusion_study import run_study  # doctest: +SKIP
    >>> run_study(build_parser().parse_args(["--output-dir", "runs/fusion"]))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from codiemb_st.evaluation.seed_statistics import RULE
from codiemb_st.experiments import ExperimentError, paired_record
from codiemb_st.experiments.seeds import IR, OVERALL, STS
from codiemb_st.file_io import json_safe, write_json_atomic, write_text_atomic
from studies.fusion import GRID, SETS, make_method, merge, study_from_reproduction, study_from_training


def run_grid(args) -> list[tuple[str, str, str, dict[str, Any]]]:
    """The grid rows asked for with ``--methods`` (Model Soup always: every Δ is measured against it)."""
    if args.methods is None:
        return GRID
    return [row for row in GRID if row[1] in args.methods or row[1] == "model_soup"]


def run_study(args) -> int:
    """Run (or resume) the study of ``args`` and write its results; returns the exit status."""
    start = time.perf_counter()
    grid = run_grid(args)  # checked before any work
    if missing := [label for label in args.also_test if label not in {row[1] for row in grid}]:
        raise ExperimentError(
            f"--also-test {missing}: not among the merges run (--methods {[row[1] for row in grid]})."
        )
    out = args.output_dir
    if args.reproduction is not None:
        study = study_from_reproduction(args, out)
    else:
        if args.sets and (unknown := [name for name in args.sets if name not in SETS]):
            raise ExperimentError(f"--sets {unknown}: the trained study has the sets {list(SETS)}.")
        study = study_from_training(args, out)
        if study is None:
            return 0
    # The reproduction's runs get their own results folder: results.json accumulates sets over invocations.
    folder = f"reproduction-{study.track}" if args.reproduction is not None else study.track
    results_dir = args.results_dir or Path("benchmarks/results/fusion") / folder
    base, dev, test, models = study.base, study.dev, study.test, study.models

    from codiemb_st.merging import ModelSoup
    from codiemb_st.merging.greedy_soup import GreedySoup

    def evaluate(path: Path | str, on_test: bool) -> dict[str, Any]:
        result = {"dev": dev.score(path)}
        if on_test and test is not None:
            result["test"] = test.score(path)
        return result

    # Results accumulate over invocations (sets may be run one at a time, e.g. while later ingredients train).
    results_path = results_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results = {"ingredients": {}, "sets": {}} | results
    results["track"], results["source"] = study.track, study.source
    results["base"] = evaluate(base, True)
    for name in sorted({n for members in study.sets.values() for n in members} | set(study.seeds)):
        # Test scores of single runs: only the seeds (for the noise level), to keep the CPU budget for the merges.
        results["ingredients"][name] = evaluate(models / name, name in study.seeds)
        write_json_atomic(results_path, json_safe(results))

    for set_name, members in study.sets.items():
        ingredients = [models / name for name in members]
        rows: dict[str, Any] = {}
        for family, label, method_name, parameters in grid:
            method = make_method(method_name, parameters, study, out)
            path = merge(method, ingredients, base, out / "merged" / set_name / label)
            rows[label] = {"family": family, "method": repr(method), **evaluate(path, False)}
            print(f"{set_name} {label}: dev {rows[label]['dev'][OVERALL]:.4f}", file=sys.stderr, flush=True)
        # Each family's setting is picked on dev only; only the picked one is evaluated on test.
        picked: dict[str, str] = {}
        for family in dict.fromkeys(f for f, *_ in grid):
            labels = [label for f, label, *_ in grid if f == family]
            picked[family] = max(labels, key=lambda label: rows[label]["dev"][OVERALL])
        # CocktailSoup uses data (training examples): it is not a candidate for "the best data-free rule".
        data_free = [f for f in picked if f != "model_soup" and not f.startswith("cocktail")]
        best_label = picked[max(data_free, key=lambda f: rows[picked[f]]["dev"][OVERALL])] if data_free else None
        greedy_specs = [] if args.greedy == "none" else [("greedy_model_soup", ModelSoup())]
        if args.greedy == "both" and best_label is not None:
            best_spec = next(g for g in grid if g[1] == best_label)
            greedy_specs.append(("greedy_best", make_method(best_spec[2], best_spec[3], study, out)))
        for label, inner in greedy_specs:
            greedy = GreedySoup(dev, method=inner)
            target = out / "merged" / set_name / label
            record = target / "greedy_soup.json"
            if record.is_file() and json.loads(record.read_text())["method"] == repr(greedy):
                result = json.loads(record.read_text())  # finished before: reuse
                rows[label] = {"family": label, "method": repr(greedy), "chosen": result["chosen"]}
                rows[label]["steps"] = result["steps"]
                rows[label] |= evaluate(target, False)
                picked[label] = label
                continue
            shutil.rmtree(target, ignore_errors=True)
            own = [results["ingredients"][name]["dev"][OVERALL] for name in members]
            result = greedy.merge_to_folder(
                ingredients, target, base_model=base, ingredient_scores=own, show_progress_bar=False
            )
            rows[label] = {
                "family": label,
                "method": repr(greedy),
                "chosen": [str(p) for p in result.chosen],
                "steps": json.loads((target / "greedy_soup.json").read_text())["steps"],
                **evaluate(result.path, False),
            }
            picked[label] = label
        # Test budget: the two references, the best data-free rule on dev and the greedy soups (with --test-picked
        # also every family's setting picked on dev, so that a dev-tuned method is paired with Model Soup on test).
        on_test = ["model_soup", "delta_soup", best_label, *(label for label, _ in greedy_specs), *args.also_test]
        on_test += list(picked.values()) if args.test_picked else []
        for label in dict.fromkeys(label for label in on_test if label in rows):
            rows[label] |= evaluate(out / "merged" / set_name / label, True)
        results["sets"][set_name] = {
            "ingredients": members,
            "rows": rows,
            "picked": dict(picked),
            "best_data_free_on_dev": best_label,
        }
        write_json_atomic(results_path, json_safe(results))

    results["noise"] = seed_noise(results, study.seeds)
    results["across_seeds"] = across_seeds(results)
    results["claim_rule"] = RULE
    results["training"] = {**results.get("training", {}), **study.logs}
    results["config"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    results.setdefault("wall_seconds_by_invocation", []).append(time.perf_counter() - start)
    results["machine"] = f"CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    write_json_atomic(results_dir / "results.json", json_safe(results))
    write_text_atomic(results_dir / "results.md", report(results))
    print(report(results))
    return 0


def across_seeds(results: dict[str, Any]) -> dict[str, Any]:
    """Every method against Model Soup, paired by seed over the ``S2_tasks@<seed>`` sets (the same recipe merged
    once per seed): mean ± sd of the per-seed differences and the claim rule's verdict, per split."""
    by_seed = {
        int(name.split("@", 1)[1]): block for name, block in results["sets"].items() if name.startswith("S2_tasks@")
    }
    if len(by_seed) < 2:
        return {}
    first_rows = next(iter(by_seed.values()))["rows"]
    # Each label, and each family of several settings as "<family> (picked on dev)": per seed, the setting its dev
    # score picked in that seed's set (a method whose setting is tuned on dev, judged on test).
    candidates: dict[str, dict[int, str]] = {
        label: dict.fromkeys(by_seed, label) for label in first_rows if label != "model_soup"
    }
    families = {row.get("family", label) for label, row in first_rows.items()}
    for family in sorted(families - {"model_soup"}):
        if sum(row.get("family") == family for row in first_rows.values()) > 1:
            picks = {seed: block["picked"].get(family) for seed, block in by_seed.items()}
            candidates[f"{family} (picked on dev)"] = {seed: pick for seed, pick in picks.items() if pick}
    comparisons: dict[str, Any] = {}
    for name, label_by_seed in candidates.items():
        for split in ("dev", "test"):
            pairs = {
                seed: (
                    by_seed[seed]["rows"][label][split][OVERALL],
                    by_seed[seed]["rows"]["model_soup"][split][OVERALL],
                )
                for seed, label in label_by_seed.items()
                if split in by_seed[seed]["rows"].get(label, {}) and split in by_seed[seed]["rows"]["model_soup"]
            }
            if len(pairs) < 2:
                continue
            first, second = {s: a for s, (a, _) in pairs.items()}, {s: b for s, (_, b) in pairs.items()}
            comparisons.setdefault(name, {})[split] = paired_record(first, second)
    return comparisons


def seed_noise(results: dict[str, Any], seeds: Sequence[str]) -> dict[str, float]:
    """Standard deviation of the CoDiEmb seeds' single-run scores (points x100), per split."""
    noise = {"seeds": len(seeds)}
    for split in ("dev", "test"):
        values = [
            results["ingredients"][n][split][OVERALL] * 100
            for n in seeds
            if split in results["ingredients"].get(n, {})
        ]
        noise[split] = statistics.stdev(values) if len(values) > 1 else float("nan")
    return noise


def ingredient_label(path: str) -> str:
    """``codiemb_s1`` for a trained ingredient, ``codiemb/seed42`` for a reproduction run (its seed folder alone
    would not say which run it is)."""
    parts = Path(path).parts
    return "/".join(parts[-2:]) if parts[-1].startswith("seed") and len(parts) > 1 else parts[-1]


def report(results: dict[str, Any]) -> str:
    """The study's Markdown report: per set, each family's setting picked on dev with its Δ vs Model Soup; the
    paired-by-seed comparisons; training time; the ingredients' own scores."""
    noise = results.get("noise", {})
    lines = [
        f"# Fusion study, {results.get('track', 'en')} track",
        "",
        f"Ingredients: {results.get('source') or 'trained by this script'}.",
        "",
        f"Seed noise (std of {noise.get('seeds', 3)} CoDiEmb seeds' overall, x100): dev "
        f"{noise.get('dev', float('nan')):.2f}, test {noise.get('test', float('nan')):.2f}. Settings picked on dev; "
        "Δ = vs Model Soup of the same set.",
        "",
    ]
    for set_name, block in results["sets"].items():
        lines += [f"## {set_name}: {', '.join(block['ingredients'])}", ""]
        lines += ["| method (picked on dev) | dev overall | Δ dev | test overall | Δ test | test IR | test STS |"]
        lines += ["|---|---:|---:|---:|---:|---:|---:|"]
        soup = block["rows"]["model_soup"]
        for label in block["picked"].values():
            row = block["rows"][label]
            d, t = row["dev"][OVERALL] * 100, row.get("test", {}).get(OVERALL)
            cells = [f"{d:.2f}", f"{d - soup['dev'][OVERALL] * 100:+.2f}"]
            if t is not None:
                cells += [f"{t * 100:.2f}", f"{(t - soup['test'][OVERALL]) * 100:+.2f}"]
                cells += [f"{row['test'][IR] * 100:.2f}", f"{row['test'][STS] * 100:.2f}"]
            else:
                cells += ["", "", "", ""]
            chosen = f" (kept: {', '.join(ingredient_label(c) for c in row['chosen'])})" if "chosen" in row else ""
            lines.append(f"| {label}{chosen} | " + " | ".join(cells) + " |")
        lines.append("")
    if results.get("across_seeds"):
        lines += ["## Against Model Soup, paired by seed (the S2_tasks@<seed> sets)", ""]
        lines += [f"Rule: {results.get('claim_rule', RULE)}.", ""]
        lines += ["| method | dev Δ vs Model Soup | test Δ vs Model Soup |", "|---|---|---|"]
        for label, by_split in results["across_seeds"].items():
            cells = [by_split.get(split, {}).get("text", "") for split in ("dev", "test")]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    training = ", ".join(f"{name} {log['seconds'] / 60:.1f}" for name, log in results.get("training", {}).items())
    lines += [f"Training minutes (1 thread, shared CPU): {training}.", ""]
    lines += ["## Ingredients", "", "| model | dev overall | test overall |", "|---|---:|---:|"]
    for name, row in {"base": results["base"], **results["ingredients"]}.items():
        test = row.get("test", {}).get(OVERALL)
        lines.append(f"| {name} | {row['dev'][OVERALL] * 100:.2f} | {'' if test is None else f'{test * 100:.2f}'} |")
    return "\n".join(lines) + "\n"


__all__ = ["across_seeds", "ingredient_label", "report", "run_grid", "run_study", "seed_noise"]
