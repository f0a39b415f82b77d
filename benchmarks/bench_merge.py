"""Benchmark: merging 3 checkpoints of all-mpnet-base-v2 size (MPNet, 768 hidden, 12 layers, ~110M parameters).

Compares, each in its own subprocess (so peak RSS is the child's own ``resource.getrusage`` maximum):

- ``load``: loading one model with ``SentenceTransformer(path)``: the "one model" memory reference.
- ``deltasoup``: ``DeltaSoup().merge(checkpoints, base, output_path)``: stream-merge, write the folder, load it.
- ``deltasoup-folder``: ``DeltaSoup().merge_to_folder(...)``: stream-merge and write only (no model loaded).
- ``modelsoup``: ``ModelSoup().merge(checkpoints, output_path=...)``: the same uniform average as ST's linear merge.
- ``modelstock-folder``, ``ties-folder``, ``deltasoup-variant-folder``: ``ModelStock()``, ``TIES()`` and
  ``DeltaSoup(sign_consensus=True, rescale=True)`` ``.merge_to_folder(...)``: the methods with whole-tensor statistics
  (TIES: two radix-select passes for its exact top-k thresholds, then the merge pass).
- ``modelsoup-folder``: ``ModelSoup().merge_to_folder(...)``: the default of ``codiemb-st merge``, beside the other
  folder modes.
- ``slerp-folder``, ``multislerp-folder``: ``SLERP()`` (of the first two checkpoints: SLERP merges two) and
  ``MultiSLERP()`` ``.merge_to_folder(...)`` of the deltas (one Gram-matrix pass per tensor, then the merge pass).
- ``cocktail-folder``: ``CocktailSoup(examples).merge_to_folder(...)``: every checkpoint loaded and scored in turn on
  20 IR records and 20 STS pairs (synthetic texts, written next to the models), then the weighted average streamed.
- ``st-linear``: ``SentenceTransformer.merge(checkpoints, method="linear")`` then ``.save(output)`` (needs mergekit,
  ``pip install "sentence-transformers[merge]"``; skipped if missing).
- ``naive``: load every checkpoint, average the state dicts, ``load_state_dict`` into the first one, ``.save(output)``.

Every mode that returns a model reads all of its parameters once before the clock stops (transformers maps weights
lazily; this puts the model really in memory, as a first ``encode`` would), so "load" is one model in memory.

Models are random weights of that shape (built offline), the checkpoints are the base plus seeded noise. Each mode
runs ``--repeats`` times (interleaved); the table shows medians and ratios against ``st-linear`` (time) and ``load``
(memory), measured in the same run. Everything is written under a temporary folder in ``--workdir`` and removed.

``--size minilm`` uses all-MiniLM-L6-v2's shape instead (BERT, 384 hidden, 6 layers, ~23M parameters).

Usage:
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_merge.py --repeats 3
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/bench_merge.py --size minilm --num-checkpoints 6 --repeats 2 \
        --modes load modelsoup-folder deltasoup-folder ties-folder multislerp-folder cocktail-folder naive
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Standard library only at import time: the parent must stay small (its children's ru_maxrss starts at its RSS).
from measurement.checkpoints import SIZES, build_checkpoints
from measurement.memory import peak_rss_mb
from measurement.tables import markdown_header, markdown_row, ratio_cell
from measurement.timing import cpu_seconds
from measurement.workers import run_worker

MODES = (
    "load",
    "deltasoup",
    "deltasoup-folder",
    "modelsoup",
    "modelstock-folder",
    "ties-folder",
    "deltasoup-variant-folder",
    "modelsoup-folder",
    "slerp-folder",
    "multislerp-folder",
    "cocktail-folder",
    "st-linear",
    "naive",
)
#: merge_to_folder modes: no model is loaded afterwards.
FOLDER_MODES = (
    "deltasoup-folder",
    "modelstock-folder",
    "ties-folder",
    "deltasoup-variant-folder",
    "modelsoup-folder",
    "slerp-folder",
    "multislerp-folder",
    "cocktail-folder",
)
#: The model shapes: ``transformers`` config class name and its options.


def run_child(mode: str, workdir: Path, num_checkpoints: int) -> dict:
    """Runs in the child process: one merge (or load), timed, with its own peak RSS."""
    import torch
    from sentence_transformers import SentenceTransformer

    from codiemb_st.merging import SLERP, TIES, CocktailSoup, DeltaSoup, ModelSoup, ModelStock, MultiSLERP

    checkpoints = [workdir / f"ckpt{c}" for c in range(num_checkpoints)]
    base = workdir / "base"
    output = workdir / f"out-{mode}"
    imports_rss = peak_rss_mb()
    start, start_cpu = time.perf_counter(), cpu_seconds()
    if mode == "load":
        model = SentenceTransformer(str(base), device="cpu")
    elif mode == "deltasoup":
        model = DeltaSoup().merge(checkpoints, base_model=base, output_path=output, show_progress_bar=False)
    elif mode == "deltasoup-folder":
        DeltaSoup().merge_to_folder(checkpoints, output, base_model=base, show_progress_bar=False)
    elif mode in ("modelstock-folder", "ties-folder", "deltasoup-variant-folder"):
        method = {
            "modelstock-folder": ModelStock(),
            "ties-folder": TIES(),
            "deltasoup-variant-folder": DeltaSoup(sign_consensus=True, rescale=True),
        }[mode]
        method.merge_to_folder(checkpoints, output, base_model=base, show_progress_bar=False)
    elif mode == "modelsoup-folder":
        ModelSoup().merge_to_folder(checkpoints, output, show_progress_bar=False)
    elif mode == "slerp-folder":
        SLERP().merge_to_folder(checkpoints[:2], output, base_model=base, show_progress_bar=False)
    elif mode == "multislerp-folder":
        MultiSLERP().merge_to_folder(checkpoints, output, base_model=base, show_progress_bar=False)
    elif mode == "cocktail-folder":
        examples = [workdir / "examples-ir.jsonl", workdir / "examples-sts.jsonl"]
        CocktailSoup(examples).merge_to_folder(checkpoints, output, show_progress_bar=False)
    elif mode == "modelsoup":
        model = ModelSoup().merge(checkpoints, output_path=output, show_progress_bar=False)
    elif mode == "st-linear":
        try:
            import mergekit  # noqa: F401
        except ImportError:
            return {"skipped": "mergekit is not installed: pip install 'sentence-transformers[merge]'"}
        model = SentenceTransformer.merge([str(c) for c in checkpoints], method="linear", device="cpu")
        model.save(str(output))
    elif mode == "naive":
        models = [SentenceTransformer(str(c), device="cpu") for c in checkpoints]
        states = [m.state_dict() for m in models]
        averaged = {
            name: torch.stack([s[name] for s in states]).mean(0) if value.is_floating_point() else value
            for name, value in states[0].items()
        }
        model = models[0]
        model.load_state_dict(averaged)
        model.save(str(output))
    else:
        raise ValueError(f"unknown mode {mode!r}")
    if mode not in FOLDER_MODES:
        # transformers maps safetensors weights lazily: read every parameter once so that the model is really in
        # memory (as it is after its first encode), for the reference and for every merge that returns a model.
        sum(float(p.detach().sum()) for p in model.parameters())
    seconds, cpu = time.perf_counter() - start, cpu_seconds() - start_cpu
    return {"seconds": seconds, "cpu_seconds": cpu, "peak_rss_mb": peak_rss_mb(), "imports_rss_mb": imports_rss}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-checkpoints", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--size", choices=sorted(SIZES), default="mpnet", help="model shape (default mpnet)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--child", choices=(*MODES, "build"), help=argparse.SUPPRESS)
    parser.add_argument("--models-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child == "build":
        build_checkpoints(args.models_dir, args.num_checkpoints, args.size)
        return
    if args.child:
        print(json.dumps(run_child(args.child, args.models_dir, args.num_checkpoints)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    workdir = Path(tempfile.mkdtemp(prefix="bench_merge_", dir=args.workdir))
    try:
        print(f"Building a base and {args.num_checkpoints} checkpoints in {workdir} ...", flush=True)
        # Everything heavy runs in children: on Linux a child's ru_maxrss starts at its parent's RSS at fork time,
        # so this parent process imports nothing but the standard library.
        child = [
            sys.executable,
            __file__,
            "--models-dir",
            str(workdir),
            "--num-checkpoints",
            str(args.num_checkpoints),
            "--size",
            args.size,
        ]
        subprocess.run([*child, "--child", "build"], env=env, check=True, capture_output=True)
        model_mb = (workdir / "base" / "model.safetensors").stat().st_size / 2**20
        results: dict[str, list[dict]] = {mode: [] for mode in args.modes}
        for repeat in range(args.repeats):
            for mode in args.modes:
                result = run_worker([*child, "--child", mode], name=mode, env=env)
                results[mode].append(result)
                shutil.rmtree(workdir / f"out-{mode}", ignore_errors=True)
                print(f"repeat {repeat + 1} {mode}: {result}", flush=True)
        report(results, model_mb, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: dict[str, list[dict]], model_mb: float, args: argparse.Namespace) -> None:
    medians = {}
    for mode, runs in results.items():
        if runs and "skipped" not in runs[0]:
            medians[mode] = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    # Time baseline: sentence-transformers' own linear merge when measured, else the uniform Model Soup (folder).
    reference = "st-linear" if "st-linear" in medians else "modelsoup-folder"
    st_time = medians.get(reference, {}).get("seconds")
    st_cpu = medians.get(reference, {}).get("cpu_seconds")
    load_rss = medians.get("load", {}).get("peak_rss_mb")
    print(
        f"\n{args.num_checkpoints} checkpoints ({args.size} shape; slerp-folder merges the first 2) of {model_mb:.0f} MB "
        f"(float32 safetensors), medians of {args.repeats} "
        f"runs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}, {os.cpu_count()} CPUs\n"
    )
    headers = ["mode", "wall time (s)", f"wall / {reference}", "CPU time (s)", f"CPU / {reference}", "peak RSS (MB)"]
    print("\n".join(markdown_header([*headers, "peak RSS / load one model", "RSS above imports / model size"])))
    for mode in args.modes:
        if mode not in medians:
            print(f"| {mode} | skipped: {results[mode][0].get('skipped')} | | | | | | |")
            continue
        m = medians[mode]
        above = (m["peak_rss_mb"] - m["imports_rss_mb"]) / model_mb
        cells = [mode, f"{m['seconds']:.2f}", ratio_cell(m["seconds"], st_time), f"{m['cpu_seconds']:.2f}"]
        cells += [ratio_cell(m["cpu_seconds"], st_cpu), f"{m['peak_rss_mb']:.0f}"]
        print(markdown_row([*cells, ratio_cell(m["peak_rss_mb"], load_rss), f"{above:.2f}x"]))


if __name__ == "__main__":
    main()
