"""Benchmark the codiemb-st losses against baselines measured in the same run.

IR (``--loss ir``), MultiPositiveCachedInfoNCELoss at P = 1 against the baseline of the issue-17 targets: at a batch
that fits in one mini-batch per column (single pass), sentence-transformers' MultipleNegativesRankingLoss (targets:
time and peak memory <= 1.05x; CachedMultipleNegativesRankingLoss shown for context); at larger batches,
CachedMultipleNegativesRankingLoss (targets: time <= 0.95x, peak memory <= 1.0x), for every ``--ir-keep-graphs``
value. Time: the contenders of a batch size alternate step by step in one process for ``--ir-repeats`` rounds after
a warm-up, and the ratio is the median over rounds of contender / baseline in the same round; on the CPU the time is
the process's CPU time (one torch thread; the wall clock of a shared machine also measures the neighbours), on CUDA
the synchronised wall clock. Memory: every contender in its own fresh process, the growth of the resident set
(VmHWM) over the state after loading the model and a 4-row warm-up step (``--ir-live-memory`` repeats it with a fixed
glibc mmap threshold, which makes the peak track live tensors), or torch.cuda.max_memory_allocated on CUDA.
``--device cuda`` adds bf16 autocast rows (the model's forward wrapped as accelerate does for ``bf16=True``, so the
GradCache replay is autocast too); ``--ir-multi-positive`` adds P = 2 against encoding every column and looping over
the positive slots.

STS (``--loss sts``), PearsonSpearmanLoss:
  1. Loss only: forward + backward of the loss on given cosine scores at several batch sizes, against a transcription
     of the official CoDiEmb implementation (scipy ranking on the CPU, Python loop over the batch for PRO), for three
     label kinds: stsb (STSBenchmark test scores resampled: 0-5, 70 distinct values), binary (0/1, like most C-MTEB
     STS sets) and continuous (all distinct: the worst case, where PRO is quadratic in the batch size).
  2. One training step (forward + backward + AdamW step) of a real model on STSBenchmark pairs, against
     sentence-transformers' CoSENTLoss on the same batch.
Times are medians after one warm-up, the contenders alternating round by round (``--repeats`` rounds) so that
both see the same load on a shared machine.

MidNCE (``--loss mid-nce``), the middle-layer InfoNCE term of PearsonSpearmanLoss: one training step (forward +
backward + AdamW step) on STSBenchmark pairs with the term (``mid_nce_weight=1``, the default) against without it
(``mid_nce_weight=0``), at ``--mid-batch-sizes``. Time: the two alternate in one process, ``--mid-repeats`` rounds
after a warm-up, medians. Peak memory: each configuration in its own fresh process, measured like the IR benchmark's,
and the activations autograd saves for backward in one step (deterministic, unlike the resident-set peak on CPU).

Teacher terms (``--loss teacher``, issue 30): MultiPositiveCachedInfoNCELoss with distillation, all four
``directions`` and hardness against itself without them (target: distillation <= 1.02x), and with a guide model against
sentence-transformers' CachedGISTEmbedLoss (``contrast_anchors=False, contrast_positives=False``, same batch,
mini-batch and guide; target <= 0.85x), on seeded en_snli samples (real lengths), in the single pass (batch 32 =
mini-batch) and under GradCache (batch 64, mini-batch 16). Time only (CPU time, interleaved rounds, medians of the
per-round ratios); writes ``results.json`` and ``results.md`` to ``--teacher-output``.

Length-aware embedding (``--loss length-aware``, issue 22): both losses with ``sort_by_length`` on (the default) and
off, against sentence-transformers' MultipleNegativesRankingLoss (IR, batch fits one mini-batch),
CachedMultipleNegativesRankingLoss (IR, several mini-batches) and CoSENTLoss (STS), on seeded samples of the shared
training data (en_snli, zh_simclue, en_stsb) and on SciFact claims with their cited abstracts at 256 and 512 tokens;
SciFact at 128 tokens (nearly every abstract truncated: uniform lengths) against the unsorted path. Each row prints the
padding efficiency (real / embedded tokens) beside the time and peak memory; a counted (untimed) padding table
follows.

Usage:
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_losses.py --loss ir --ir-batch-sizes 32 128 256 \\
        --max-seq-length 32 --ir-live-memory
    PYTHONPATH=. python benchmarks/bench_losses.py --loss ir --device cuda --ir-batch-sizes 32 128 256 --ir-repeats 10
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_losses.py --loss sts     # packaged all-MiniLM-L6-v2, CPU
    PYTHONPATH=. python benchmarks/bench_losses.py --loss sts --device cuda --sts-batch-sizes 256 4096 16384
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_losses.py --loss mid-nce --mid-batch-sizes 32 256
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_losses.py --loss length-aware --repeats 3
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_losses.py --loss teacher --teacher-repeats 9
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from measurement.baselines import naive_multi_positive_infonce, official_sts_loss_loop
from measurement.data import column_features, sample_columns, sts_labels, stsb_test_rows, word_texts
from measurement.memory import peak_since, reset_peak, saved_activations_bytes
from measurement.padding import padding_efficiency
from measurement.tables import is_met, markdown_header, markdown_row, target_verdict
from measurement.timing import interleaved_medians, interleaved_rounds, ratio_summary
from measurement.workers import run_worker


def _default_model_path() -> str:
    from codiemb_st.default_model import default_model_path

    return default_model_path()


# ----------------------------------------------------------------------------------------------------------------
# IR: MultiPositiveCachedInfoNCELoss
# ----------------------------------------------------------------------------------------------------------------


def _contender_label(contender: dict) -> str:
    names = {"MNRL": "ST MNRL", "CMNRL": "ST CachedMNRL", "naive-loop": "encode all + loop over slots"}
    return names.get(contender["loss"]) or f"ours (keep_graphs={contender['keep_graphs']})"


def _ir_setup(config: dict) -> tuple:
    """Load the model and the tokenized batch of one IR configuration (in this process)."""
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    device = config["device"]
    model = SentenceTransformer(config["model"], device=device)
    model.max_seq_length = config["max_seq_length"]
    model.train()
    if config["autocast"] == "bf16":
        from accelerate.utils import convert_outputs_to_fp32

        # What the trainer does with bf16=True (accelerate's prepare_model): the model's forward runs under bf16
        # autocast and returns fp32 outputs. Wrapping the forward, not the step, means the GradCache replay (which
        # runs in the backward pass) is autocast too, as in training.
        model.forward = convert_outputs_to_fp32(
            torch.autocast(torch.device(device).type, dtype=torch.bfloat16)(model.forward)
        )
    batch, num_pos, num_neg = config["batch_size"], config["num_positives"], config["num_negatives"]
    columns = [word_texts(batch, 12, seed=0)] + [word_texts(batch, 40, seed=1 + c) for c in range(num_pos + num_neg)]
    features = column_features(model, columns, device)
    warmup_features = column_features(model, [column[:4] for column in columns], device)
    return model, features, warmup_features


def _ir_step(model, config: dict, contender: dict) -> Callable[[list[dict]], None]:
    """One training step (zero_grad, forward, backward) of ``contender`` on given features."""
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from codiemb_st import MultiPositiveCachedInfoNCELoss

    scale = 1.0 / config["temperature"]
    mini_batch, num_pos = config["mini_batch_size"], config["num_positives"]
    name = contender["loss"]
    if name == "MNRL":
        loss_fn = MultipleNegativesRankingLoss(model, scale=scale)
    elif name == "CMNRL":
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=mini_batch)
    elif name == "ours":
        loss_fn = MultiPositiveCachedInfoNCELoss(
            model,
            num_positives=num_pos,
            temperature=config["temperature"],
            mini_batch_size=mini_batch,
            keep_graphs=contender["keep_graphs"],
        )
    elif name == "naive-loop":  # encode every column once (no cache), loop over the slots
        loss_fn = naive_multi_positive_infonce(model, num_pos, scale)
    else:
        raise ValueError(f"unknown loss {name!r}")

    def step(step_features: list[dict]) -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(step_features, None).backward()

    return step


def _ir_memory_worker(config: dict) -> dict:
    """Peak memory of one contender's first full training step, in this (fresh) process."""
    model, features, warmup_features = _ir_setup(config)
    step = _ir_step(model, config, config["contender"])
    # Warm up on a 4-row batch so one-time allocations (kernels, thread pools) are not counted as the loss's memory.
    step(warmup_features)
    baseline = reset_peak(config["device"])
    step(features)
    peak = peak_since(baseline, config["device"])
    return {"peak_mib": peak / 2**20}


def _mid_nce_setup(model_path: str, device: str, max_seq_length: int, batch_size: int):
    """A MiniLM in training mode, an AdamW optimizer and ``step(loss, features)`` on STSBenchmark pairs."""
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(model_path, device=device)
    model.max_seq_length = max_seq_length
    model.train()
    rows = stsb_test_rows()
    if batch_size > len(rows):
        raise ValueError(f"batch size {batch_size} > {len(rows)} STSBenchmark test pairs")

    def batch(count: int) -> tuple[list[dict], torch.Tensor]:
        columns = [[row[column] for row in rows[:count]] for column in ("sentence1", "sentence2")]
        features = column_features(model, columns, device)
        return features, torch.tensor([row["score"] for row in rows[:count]], device=device)

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def step(loss: torch.nn.Module, features: list[dict], labels: torch.Tensor) -> None:
        optimizer.zero_grad(set_to_none=True)
        # Fresh dicts, since the model writes its outputs into the feature dicts it is given; held until after
        # backward, as the trainer holds its batch.
        step_features = [dict(column) for column in features]
        loss(step_features, labels).backward()
        optimizer.step()
        del step_features

    return model, batch, step


def _mid_nce_worker(config: dict) -> dict:
    """Peak memory of one training step of one MidNCE configuration, in this (fresh) process."""
    from codiemb_st import PearsonSpearmanLoss

    device = config["device"]
    model, batch, step = _mid_nce_setup(config["model"], device, config["max_seq_length"], config["batch_size"])
    loss = PearsonSpearmanLoss(model, mid_nce_weight=config["mid_nce_weight"])
    features, labels = batch(config["batch_size"])
    # Warm up on a 4-pair batch so one-time allocations (AdamW state, gradient buffers, thread pools) are not
    # counted as the term's memory.
    step(loss, *batch(4))
    baseline = reset_peak(device)
    step(loss, features, labels)
    peak = peak_since(baseline, device)

    # The resident-set peak moves by +-10% between fresh processes on CPU (allocator reuse), so also count the
    # activations autograd saves for backward in one step (unique storages, parameters left out): deterministic, and
    # where the term's cost would show.
    saved = saved_activations_bytes(lambda: step(loss, features, labels), exclude=model.parameters())
    return {"peak_mib": peak / 2**20, "saved_mib": saved / 2**20}


def bench_mid_nce(args: argparse.Namespace) -> None:
    from codiemb_st import PearsonSpearmanLoss

    model_path = args.model or _default_model_path()
    print(
        f"MidNCE benchmark: model={args.model or 'all-MiniLM-L6-v2 (packaged)'} device={args.device} "
        f"max_seq_length={args.max_seq_length} "
        f"torch threads={torch.get_num_threads()}, {args.mid_repeats} timing rounds alternating the two losses\n"
        "one training step = forward + backward + AdamW on STSBenchmark test pairs; memory = peak growth over the "
        f"loaded model after a 4-pair warm-up step, median of {args.mid_memory_repeats} fresh processes per "
        "configuration; saved activations = unique non-parameter storages autograd keeps for backward in one step\n"
    )
    rows = []
    for batch_size in args.mid_batch_sizes:
        base = {"model": model_path, "device": args.device, "max_seq_length": args.max_seq_length}
        samples: dict[str, list[float]] = {"without": [], "with": []}
        saved: dict[str, float] = {}
        for _ in range(args.mid_memory_repeats):  # alternating fresh processes, as for the times
            for name, weight in (("without", 0.0), ("with", 1.0)):
                config = {
                    **base,
                    "batch_size": batch_size,
                    "mid_nce_weight": weight,
                }
                result = _run_worker("mid-nce", config)
                samples[name].append(result["peak_mib"])
                saved[name] = result["saved_mib"]
        peaks = {name: statistics.median(values) for name, values in samples.items()}
        print(f"  measured batch={batch_size} peak MiB per fresh process: {samples}; saved MiB: {saved}", flush=True)

        model, batch, step = _mid_nce_setup(model_path, args.device, args.max_seq_length, batch_size)
        features, labels = batch(batch_size)
        losses = {"without": PearsonSpearmanLoss(model, mid_nce_weight=0.0), "with": PearsonSpearmanLoss(model)}
        medians = interleaved_medians(
            {name: (functools.partial(step, loss, features, labels), 1) for name, loss in losses.items()},
            args.mid_repeats,
            args.device,
        )
        print(f"  measured batch={batch_size} s/step: {medians}", flush=True)
        rows.append((batch_size, medians, peaks, saved))

    print(
        "\n| batch | s/step without | s/step with | time ratio | peak MiB without | peak MiB with | peak ratio "
        "| saved activations MiB without | with | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for batch_size, medians, peaks, saved in rows:
        print(
            f"| {batch_size} | {medians['without']:.3f} | {medians['with']:.3f} "
            f"| {medians['with'] / medians['without']:.2f}x | {peaks['without']:.0f} | {peaks['with']:.0f} "
            f"| {peaks['with'] / peaks['without']:.2f}x | {saved['without']:.1f} | {saved['with']:.1f} "
            f"| {saved['with'] / saved['without']:.3f}x |"
        )


def _ir_time_worker(config: dict) -> dict:
    """Seconds per step of every contender of one configuration, alternating them round by round (one process)."""
    model, features, warmup_features = _ir_setup(config)
    steps = {_contender_label(c): _ir_step(model, config, c) for c in config["contenders"]}
    for step in steps.values():  # warm-up: small batch, then one untimed full step
        step(warmup_features)
        step(features)
    # Wall clock and the process's CPU time. On a shared CPU the wall clock also measures the neighbours; with one
    # torch thread, CPU time measures the step's own work. On CUDA only the (synchronised) wall clock means anything.
    timed_steps = {label: functools.partial(step, features) for label, step in steps.items()}
    return interleaved_rounds(timed_steps, config["rounds"], config["device"])


def _run_worker(mode: str, config: dict, env: dict[str, str] | None = None) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps({"mode": mode, **config})]
    return run_worker(command, name=f"{mode} worker for {config}", env=env)


def _ir_groups(args: argparse.Namespace) -> list[dict]:
    """The comparisons: per batch size, the baseline named by the issue's targets and our loss against it."""
    autocasts = args.ir_autocast or (["none", "bf16"] if args.device.startswith("cuda") else ["none"])
    groups = []
    for autocast in autocasts:
        for batch in args.ir_batch_sizes:
            ours = [{"loss": "ours", "keep_graphs": k} for k in args.ir_keep_graphs]
            if batch <= args.ir_mini_batch_size:
                # The whole step fits in one mini-batch per column: our single pass against the uncached MNRL
                # (targets: time and memory <= 1.05x), with ST's cached loss for context.
                baseline = {"loss": "MNRL", "keep_graphs": None}
                others = [{"loss": "CMNRL", "keep_graphs": None}, *ours[:1]]
                target = (1.05, 1.05)
            else:  # several mini-batches: against ST's cached loss (targets: time <= 0.95x, memory <= 1.0x)
                baseline = {"loss": "CMNRL", "keep_graphs": None}
                others, target = ours, (0.95, 1.0)
            groups.append(
                {
                    "num_positives": 1,
                    "batch": batch,
                    "autocast": autocast,
                    "contenders": [baseline, *others],
                    "target": target,
                }
            )
            if args.ir_multi_positive:  # P = 2: against encoding every column and looping over the slots
                baseline = {"loss": "naive-loop", "keep_graphs": None}
                groups.append(
                    {
                        "num_positives": 2,
                        "batch": batch,
                        "autocast": autocast,
                        "contenders": [baseline, *ours[:1]],
                        "target": None,
                    }
                )
    return groups


def bench_ir(args: argparse.Namespace) -> None:
    base = {
        "model": args.model or _default_model_path(),
        "device": args.device,
        "max_seq_length": args.max_seq_length,
        "mini_batch_size": args.ir_mini_batch_size,
        "temperature": 0.02,
        "num_negatives": args.ir_num_negatives,
    }
    print(
        f"IR loss benchmark: model={Path(base['model']).name} device={args.device} max_seq_length={args.max_seq_length}"
        f" mini_batch_size={args.ir_mini_batch_size} hard negatives={args.ir_num_negatives} rounds={args.ir_repeats}"
        f" torch threads={torch.get_num_threads()}\n"
        f"time = {'CPU seconds of the process' if args.device == 'cpu' else 'seconds'} per training step (zero_grad +"
        " forward + backward); the contenders of a row group alternate step by step in one process; ratio = median"
        " over rounds of (contender / baseline) in the same round; wall ratio = the same on the wall clock\n"
        "memory = peak growth over the loaded model during the first full step, one fresh process per contender\n",
        flush=True,
    )
    rows = []
    for group in _ir_groups(args):
        config = {
            **base,
            "batch_size": group["batch"],
            "num_positives": group["num_positives"],
            "autocast": group["autocast"],
        }
        timing = _run_worker("time", {**config, "contenders": group["contenders"], "rounds": args.ir_repeats})
        # CPU time on the CPU (see _ir_time_worker), wall clock on an accelerator.
        times = timing["cpu_times"] if args.device == "cpu" else timing["times"]
        peaks, live_peaks = {}, {}
        for contender in group["contenders"]:
            label = _contender_label(contender)
            peaks[label] = _run_worker("memory", {**config, "contender": contender})["peak_mib"]
            if args.ir_live_memory:
                # glibc's dynamic mmap threshold keeps freed tensors in the heap, so the resident-set peak depends
                # on the order of allocations as well as on what is alive; with a fixed threshold every large
                # tensor is unmapped when freed and the peak tracks the live tensors.
                env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
                live_peaks[label] = _run_worker("memory", {**config, "contender": contender}, env=env)["peak_mib"]
        baseline = _contender_label(group["contenders"][0])
        for contender in group["contenders"]:
            label = _contender_label(contender)
            time_ratio, low, high = ratio_summary(times[label], times[baseline])
            row = {
                "wall_seconds": statistics.median(timing["times"][label]),
                "wall_ratio": ratio_summary(timing["times"][label], timing["times"][baseline])[0],
                "live_peak_mib": live_peaks.get(label),
                "live_memory_ratio": live_peaks[label] / live_peaks[baseline] if live_peaks else None,
                "precision": "bf16 autocast" if group["autocast"] == "bf16" else "fp32",
                "P": group["num_positives"],
                "batch": group["batch"],
                "label": label,
                "seconds": statistics.median(times[label]),
                "time_ratio": time_ratio,
                "ratio_range": (low, high),
                "peak_mib": peaks[label],
                "memory_ratio": peaks[label] / peaks[baseline],
                "baseline": baseline,
                "target": group["target"] if contender["loss"] == "ours" else None,
            }
            rows.append(row)
            print(f"  measured {row}", flush=True)

    clock = "CPU s" if args.device == "cpu" else "s"
    live = args.ir_live_memory
    live_headers = ["live peak MiB", "live ratio"] if live else []
    headers = ["precision", "P", "batch", "loss", f"{clock}/step", "time ratio (min-max over rounds)", "wall ratio"]
    print(
        "\n"
        + "\n".join(
            markdown_header([*headers, "peak MiB", "memory ratio", *live_headers, "vs", "target (time, memory)"])
        )
    )
    for row in rows:
        low, high = row["ratio_range"]
        target = ""
        if row["target"]:
            time_target, memory_target = row["target"]
            target = f"{target_verdict(row['time_ratio'], time_target)}; {target_verdict(row['memory_ratio'], memory_target)}"
            if live:
                target += f" (live: {'met' if is_met(row['live_memory_ratio'], memory_target) else 'not met'})"
        live_cells = [f"{row['live_peak_mib']:.0f}", f"{row['live_memory_ratio']:.2f}x"] if live else []
        cells = [row["precision"], row["P"], row["batch"], row["label"], f"{row['seconds']:.2f}"]
        cells += [
            f"{row['time_ratio']:.2f}x ({low:.2f}-{high:.2f})",
            f"{row['wall_ratio']:.2f}x",
            f"{row['peak_mib']:.0f}",
        ]
        print(markdown_row([*cells, f"{row['memory_ratio']:.2f}x", *live_cells, row["baseline"], target]))


# ----------------------------------------------------------------------------------------------------------------
# STS: PearsonSpearmanLoss
# ----------------------------------------------------------------------------------------------------------------


def _backward_step(loss_fn: Callable, scores: torch.Tensor, labels: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        scores.grad = None
        loss_fn(scores, labels).backward()

    return step


def bench_sts_loss_only(args: argparse.Namespace) -> list[dict]:
    from codiemb_st import PearsonSpearmanLoss

    loss = PearsonSpearmanLoss(None)
    rows = []
    for kind in ("stsb", "binary", "continuous"):
        for n in args.sts_batch_sizes:
            generator = torch.Generator().manual_seed(n)
            scores = (torch.rand(n, generator=generator) * 2 - 1).to(args.device).requires_grad_(True)
            labels = sts_labels(kind, n, generator).to(args.device)

            ours_value = loss.compute_loss_from_scores(scores, labels).item()
            loop_value = official_sts_loss_loop(scores, labels).item()
            if abs(ours_value - loop_value) > 1e-3 * max(1.0, abs(loop_value)):
                raise RuntimeError(f"values differ at n={n} ({kind}): ours {ours_value} vs loop {loop_value}")

            medians = interleaved_medians(
                {
                    "ours": (_backward_step(loss.compute_loss_from_scores, scores, labels), args.sts_loss_runs),
                    "loop": (_backward_step(official_sts_loss_loop, scores, labels), 1),
                },
                args.repeats,
                args.device,
            )
            ours_s, loop_s = medians["ours"], medians["loop"]
            rows.append({"labels": kind, "batch": n, "ours_ms": 1e3 * ours_s, "loop_ms": 1e3 * loop_s})
            print(f"  measured {rows[-1]}", flush=True)
    return rows


def bench_sts_training_step(args: argparse.Namespace) -> list[dict]:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    from codiemb_st import PearsonSpearmanLoss

    rows_in = stsb_test_rows()[: args.sts_train_batch_size]
    model = SentenceTransformer(args.model or _default_model_path(), device=args.device)
    model.max_seq_length = args.max_seq_length
    model.train()
    columns = [[row[column] for row in rows_in] for column in ("sentence1", "sentence2")]
    features = column_features(model, columns, args.device)
    labels = torch.tensor([row["score"] for row in rows_in], device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def training_step(loss: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss(features, labels).backward()
            optimizer.step()

        return step

    medians = interleaved_medians(
        {
            "CoSENTLoss": (training_step(CoSENTLoss(model)), 1),
            "PearsonSpearmanLoss": (training_step(PearsonSpearmanLoss(model)), 1),
        },
        args.repeats,
        args.device,
    )
    return [{"loss": name, "step_s": seconds} for name, seconds in medians.items()]


def bench_sts(args: argparse.Namespace) -> None:
    print(
        f"STS loss benchmark: device={args.device} torch threads={torch.get_num_threads()}, {args.repeats} rounds "
        f"alternating the contenders ({args.sts_loss_runs} runs of the vectorised loss per loop run)\n"
        "loss only = forward + backward of the loss on given scores; baseline = official loop implementation\n"
    )
    loss_rows = bench_sts_loss_only(args)
    print("\n| labels | batch | PearsonSpearmanLoss ms | official loop ms | speed-up |")
    print("|---|---|---|---|---|")
    for row in loss_rows:
        print(
            f"| {row['labels']} | {row['batch']} | {row['ours_ms']:.2f} | {row['loop_ms']:.1f} "
            f"| {row['loop_ms'] / row['ours_ms']:.0f}x |"
        )

    model_name = args.model or "all-MiniLM-L6-v2 (packaged)"
    print(
        f"\nOne training step (forward + backward + AdamW), {model_name}, {args.sts_train_batch_size} STSBenchmark "
        f"pairs, max_seq_length={args.max_seq_length}"
    )
    step_rows = bench_sts_training_step(args)
    baseline = step_rows[0]["step_s"]
    print("\n| loss | s/step | vs CoSENTLoss |")
    print("|---|---|---|")
    for row in step_rows:
        print(f"| {row['loss']} | {row['step_s']:.3f} | {row['step_s'] / baseline:.2f}x |")


# ----------------------------------------------------------------------------------------------------------------
# Length-aware embedding (issue 22): both losses on realistic lengths, padding efficiency
# ----------------------------------------------------------------------------------------------------------------


def _length_aware_setup(config: dict) -> tuple:
    """Model (training mode), the step of every contender and the tokenized batch of one row group."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        CoSENTLoss,
        MultipleNegativesRankingLoss,
    )

    from codiemb_st import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss

    torch.manual_seed(0)
    device = config["device"]
    model = SentenceTransformer(config["model"], device=device)
    model.max_seq_length = config["max_seq_length"]
    model.train()
    columns, scores = sample_columns(config["dataset"], config["batch"])
    features = column_features(model, columns, device)
    warmup = column_features(model, [column[:4] for column in columns], device)
    labels = torch.tensor(scores, device=device) if scores is not None else None
    warmup_labels = labels[:4] if labels is not None else None
    mini = config["mini_batch_size"]
    temperature = 0.02

    def make(name: str):
        if name == "ST MNRL":
            return MultipleNegativesRankingLoss(model, scale=1 / temperature)
        if name == "ST CMNRL":
            return CachedMultipleNegativesRankingLoss(model, scale=1 / temperature, mini_batch_size=mini)
        if name == "ST CoSENT":
            return CoSENTLoss(model)
        if name.startswith("ours"):
            sort = name != "ours unsorted"
            if labels is not None:
                return PearsonSpearmanLoss(model, sort_by_length=sort)
            return MultiPositiveCachedInfoNCELoss(
                model, num_positives=1, temperature=temperature, mini_batch_size=mini, sort_by_length=sort
            )
        raise ValueError(f"unknown contender {name!r}")

    def step_of(loss_fn):
        def step(step_features: list[dict], step_labels) -> None:
            model.zero_grad(set_to_none=True)
            # Fresh dicts: the model writes its outputs into the feature dicts it is given.
            loss_fn([dict(feature) for feature in step_features], step_labels).backward()

        return step

    steps = {name: step_of(make(name)) for name in config["contenders"]}
    return model, steps, (features, labels), (warmup, warmup_labels)


def _length_aware_time_worker(config: dict) -> dict:
    """CPU (and wall) seconds per step of every contender, alternating round by round; tokens embedded per step."""
    model, steps, (features, labels), (warmup, warmup_labels) = _length_aware_setup(config)
    for step in steps.values():
        step(warmup, warmup_labels)
    counted = {"real": 0, "embedded": 0}

    def count(module, args) -> None:
        mask = args[0]["attention_mask"]
        counted["real"] += int(mask.sum())
        counted["embedded"] += mask.numel()

    tokens: dict[str, dict] = {}
    for name, step in steps.items():  # one untimed full step per contender, counting the tokens it embeds
        handle = model[0].register_forward_pre_hook(count)
        counted.update(real=0, embedded=0)
        step(features, labels)
        handle.remove()
        tokens[name] = dict(counted)
    timed_steps = {name: functools.partial(step, features, labels) for name, step in steps.items()}
    return {**interleaved_rounds(timed_steps, config["rounds"], config["device"]), "tokens": tokens}


def _length_aware_memory_worker(config: dict) -> dict:
    """Peak memory of one contender's first full step in this fresh process (see _ir_memory_worker)."""
    model, steps, (features, labels), (warmup, warmup_labels) = _length_aware_setup(config)
    (step,) = steps.values()
    step(warmup, warmup_labels)
    baseline = reset_peak(config["device"])
    step(features, labels)
    return {"peak_mib": peak_since(baseline, config["device"]) / 2**20}


# (dataset, max_seq_length, batch, mini_batch_size, contenders (baseline first), targets (time, memory) of "ours")
_LENGTH_AWARE_GROUPS = [
    ("en_snli", 128, 32, 32, ["ST MNRL", "ours", "ours unsorted"], (0.85, 1.0)),
    ("en_snli", 128, 64, 16, ["ST CMNRL", "ours", "ours unsorted"], (0.75, 1.05)),
    ("zh_simclue", 128, 32, 32, ["ST MNRL", "ours", "ours unsorted"], (0.85, 1.0)),
    ("zh_simclue", 128, 64, 16, ["ST CMNRL", "ours", "ours unsorted"], (0.75, 1.05)),
    ("en_stsb", 128, 64, 64, ["ST CoSENT", "ours", "ours unsorted"], (0.65, None)),
    ("scifact", 256, 8, 8, ["ST MNRL", "ours"], None),
    ("scifact", 512, 8, 8, ["ST MNRL", "ours"], None),
    ("scifact", 128, 16, 16, ["ours unsorted", "ours"], (1.02, None)),
    ("scifact", 128, 16, 4, ["ours unsorted", "ours"], (1.02, None)),
]


def bench_length_aware(args: argparse.Namespace) -> None:
    model_path = args.model or _default_model_path()
    print(
        f"Length-aware embedding benchmark: model={Path(model_path).name} device={args.device} rounds={args.repeats}"
        f" torch threads={torch.get_num_threads()}\n"
        "step = zero_grad + forward + backward (no optimizer) on a seeded sample of the dataset; time = CPU seconds of"
        " the process per step, the contenders of a group alternating step by step in one process after a 4-row"
        " warm-up; ratio = median over rounds of (contender / baseline) in the same round; memory = peak growth"
        " (resident set with MALLOC_MMAP_THRESHOLD_=131072, so it tracks live tensors) during the first full step,"
        " one fresh process per contender; padding efficiency = real / embedded tokens over the whole step (both"
        " GradCache passes counted)\n"
        "ours = MultiPositiveCachedInfoNCELoss (IR, P=1, 1 hard negative) or PearsonSpearmanLoss (STS, default"
        " four terms), sort_by_length=True (default); 'ours unsorted' = sort_by_length=False (the behaviour before"
        " length-aware embedding)\n",
        flush=True,
    )
    groups = [g for g in _LENGTH_AWARE_GROUPS if not args.la_datasets or g[0] in args.la_datasets]
    rows = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    for dataset, max_seq_length, batch, mini, contenders, targets in groups:
        config = {
            "model": model_path,
            "device": args.device,
            "dataset": dataset,
            "max_seq_length": max_seq_length,
            "batch": batch,
            "mini_batch_size": mini,
        }
        timing = _run_worker("la-time", {**config, "contenders": contenders, "rounds": args.repeats})
        times = timing["cpu_times"] if args.device == "cpu" else timing["times"]
        peaks = {
            name: _run_worker("la-memory", {**config, "contenders": [name]}, env=env)["peak_mib"]
            for name in contenders
        }
        baseline = contenders[0]
        for name in contenders:
            time_ratio, low, high = ratio_summary(times[name], times[baseline])
            tokens = timing["tokens"][name]
            row = {
                "dataset": dataset,
                "max_seq_length": max_seq_length,
                "batch": batch,
                "mini": mini,
                "loss": name,
                "seconds": statistics.median(times[name]),
                "time_ratio": time_ratio,
                "ratio_range": (low, high),
                "peak_mib": peaks[name],
                "memory_ratio": peaks[name] / peaks[baseline] if peaks[baseline] > 0 else float("nan"),
                "efficiency": tokens["real"] / tokens["embedded"],
                "baseline": baseline,
                "targets": targets if name == "ours" else None,
            }
            rows.append(row)
            print(f"  measured {row}", flush=True)

    clock = "CPU s" if args.device == "cpu" else "s"
    headers = ["data", "max len", "batch / mini-batch", "loss", "padding efficiency", f"{clock}/step"]
    print(
        "\n"
        + "\n".join(markdown_header([*headers, "time ratio (min-max)", "peak MiB", "memory ratio", "vs", "target"]))
    )
    for row in rows:
        low, high = row["ratio_range"]
        target = ""
        if row["targets"]:
            time_target, memory_target = row["targets"]
            target = target_verdict(row["time_ratio"], time_target, "time", not_met="NOT met")
            if memory_target is not None:
                target += "; " + target_verdict(row["memory_ratio"], memory_target, "memory", not_met="NOT met")
        cells = [row["dataset"], row["max_seq_length"], f"{row['batch']} / {row['mini']}", row["loss"]]
        cells += [
            f"{100 * row['efficiency']:.0f}%",
            f"{row['seconds']:.2f}",
            f"{row['time_ratio']:.2f}x ({low:.2f}-{high:.2f})",
        ]
        print(markdown_row([*cells, f"{row['peak_mib']:.0f}", f"{row['memory_ratio']:.2f}x", row["baseline"], target]))

    if args.la_padding_batches:
        print(
            "\nPadding efficiency of the first pass at larger batches (counted, not timed): one forward per column "
            "(ST MNRL / CoSENT), ST's mini-batches trimmed of trailing padding (ST CMNRL), ours (length-sorted)"
        )
        print("\n| data | max len | batch / mini-batch | one forward per column | ST mini-batches | ours |")
        print("|---|---|---|---|---|---|")
        for dataset, max_seq_length in (
            ("en_snli", 128),
            ("zh_simclue", 128),
            ("en_stsb", 128),
            ("scifact", 256),
            ("scifact", 512),
            ("scifact", 128),
        ):
            for batch, mini in args.la_padding_batches:
                eff = padding_efficiency(model_path, dataset, max_seq_length, batch, mini)
                print(
                    f"| {dataset} | {max_seq_length} | {batch} / {mini} | {100 * eff['full']:.0f}% "
                    f"| {100 * eff['st_mini']:.0f}% | {100 * eff['ours']:.0f}% |",
                    flush=True,
                )


# ----------------------------------------------------------------------------------------------------------------
# Teacher terms (issue 30): distillation, guide masking, directions and hardness of the IR loss
# ----------------------------------------------------------------------------------------------------------------

_ALL_DIRECTIONS = ("query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc")


def _teacher_setup(config: dict) -> tuple:
    """Model and guide (training / eval mode), every contender's step and the tokenized batch with teacher scores."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import CachedGISTEmbedLoss

    from codiemb_st import MultiPositiveCachedInfoNCELoss

    torch.manual_seed(0)
    device = config["device"]
    model = SentenceTransformer(config["model"], device=device)
    model.max_seq_length = config["max_seq_length"]
    model.train()
    guide = SentenceTransformer(config["guide"], device=device)  # as loaded: eval mode, never trained
    guide.max_seq_length = config["max_seq_length"]
    columns, _ = sample_columns(config["dataset"], config["batch"])
    features = column_features(model, columns, device)
    warmup = column_features(model, [column[:4] for column in columns], device)
    # Cross-encoder-like teacher scores, one per candidate column (the loss's labels with distillation).
    labels = torch.rand(len(columns[0]), len(columns) - 1, generator=torch.Generator().manual_seed(0)) * 10 - 2
    labels = labels.to(device)
    mini, temperature = config["mini_batch_size"], 0.02
    common = {"temperature": temperature, "mini_batch_size": mini}

    def make(name: str):
        if name == "ST CachedGIST":
            return CachedGISTEmbedLoss(model, guide, contrast_anchors=False, contrast_positives=False, **common)
        options = {
            "ours": {},
            "ours + distillation": {"distillation_weight": 1.0, "student_temperature": 0.05},
            "ours + directions": {"directions": _ALL_DIRECTIONS},
            "ours + hardness": {"hardness_mode": "all_negatives", "hardness_strength": 5.0},
            "ours + guide": {"guide": guide},
        }[name]
        return MultiPositiveCachedInfoNCELoss(model, **common, **options)

    def step_of(loss_fn):
        def step(step_features: list[dict], step_labels: torch.Tensor) -> None:
            model.zero_grad(set_to_none=True)
            # Fresh dicts: the model writes its outputs into the feature dicts it is given.
            loss_fn([dict(feature) for feature in step_features], step_labels).backward()

        return step

    steps = {name: step_of(make(name)) for name in config["contenders"]}
    return steps, (features, labels), (warmup, labels[:4])


def _teacher_time_worker(config: dict) -> dict:
    """CPU (and wall) seconds per step of every contender, alternating round by round (one process)."""
    steps, (features, labels), (warmup, warmup_labels) = _teacher_setup(config)
    for step in steps.values():  # warm-up: small batch, then one untimed full step
        step(warmup, warmup_labels)
        step(features, labels)
    timed_steps = {name: functools.partial(step, features, labels) for name, step in steps.items()}
    return interleaved_rounds(timed_steps, config["rounds"], config["device"])


# (dataset, max_seq_length, batch, mini_batch_size, contenders (baseline first), {contender: time target})
_TEACHER_GROUPS = [
    (
        "en_snli",
        128,
        32,
        32,
        ["ours", "ours + distillation", "ours + directions", "ours + hardness"],
        {"ours + distillation": 1.02},
    ),
    (
        "en_snli",
        128,
        64,
        16,
        ["ours", "ours + distillation", "ours + directions", "ours + hardness"],
        {"ours + distillation": 1.02},
    ),
    ("en_snli", 128, 32, 32, ["ST CachedGIST", "ours + guide", "ours"], {"ours + guide": 0.85}),
    ("en_snli", 128, 64, 16, ["ST CachedGIST", "ours + guide", "ours"], {"ours + guide": 0.85}),
]


def bench_teacher(args: argparse.Namespace) -> None:
    model_path = args.model or _default_model_path()
    guide_path = args.guide or model_path
    command = "PYTHONPATH=. OMP_NUM_THREADS=1 python " + " ".join(sys.argv)
    header = (
        f"Teacher terms benchmark (issue 30): model={Path(model_path).name} guide={Path(guide_path).name} "
        f"device={args.device} rounds={args.teacher_repeats} torch threads={torch.get_num_threads()}\n"
        "step = zero_grad + forward + backward (no optimizer) on a seeded sample of en_snli (query, positive, hard"
        " negative; real lengths, max_seq_length 128); time = CPU seconds of the process per step (wall clock on"
        " CUDA), the contenders of a group alternating step by step in one process after a 4-row warm-up and one"
        " untimed full step; ratio = median over rounds of (contender / baseline) in the same round\n"
        "ours = MultiPositiveCachedInfoNCELoss(temperature=0.02, P=1, defaults: sort_by_length, keep_graphs=1);"
        " + distillation: distillation_weight=1, student_temperature=0.05, labels = teacher scores (batch, 2);"
        " + directions: all four, joint; + hardness: all_negatives, strength 5; + guide: guide=the guide model,"
        " margin 0; ST CachedGIST = CachedGISTEmbedLoss(model, guide, contrast_anchors=False,"
        " contrast_positives=False), same temperature and mini-batch size\n"
    )
    print(header, flush=True)
    rows = []
    for dataset, max_seq_length, batch, mini, contenders, targets in _TEACHER_GROUPS:
        config = {
            "model": model_path,
            "guide": guide_path,
            "device": args.device,
            "dataset": dataset,
            "max_seq_length": max_seq_length,
            "batch": batch,
            "mini_batch_size": mini,
            "contenders": contenders,
            "rounds": args.teacher_repeats,
        }
        timing = _run_worker("teacher-time", config)
        times = timing["cpu_times"] if args.device == "cpu" else timing["times"]
        baseline = contenders[0]
        for name in contenders:
            time_ratio, low, high = ratio_summary(times[name], times[baseline])
            row = {
                "dataset": dataset,
                "max_seq_length": max_seq_length,
                "batch": batch,
                "mini": mini,
                "loss": name,
                "seconds": statistics.median(times[name]),
                "time_ratio": time_ratio,
                "ratio_range": (low, high),
                "wall_ratio": ratio_summary(timing["times"][name], timing["times"][baseline])[0],
                "baseline": baseline,
                "target": targets.get(name),
                "round_seconds": times[name],
            }
            rows.append(row)
            print(f"  measured {row}", flush=True)

    clock = "CPU s" if args.device == "cpu" else "s"
    lines = markdown_header(
        ["data", "batch / mini-batch", "loss", f"{clock}/step", "time ratio (min-max)", "wall ratio", "vs", "target"]
    )
    for row in rows:
        low, high = row["ratio_range"]
        target = target_verdict(row["time_ratio"], row["target"], "time", not_met="NOT met") if row["target"] else ""
        cells = [row["dataset"], f"{row['batch']} / {row['mini']}", row["loss"], f"{row['seconds']:.2f}"]
        cells += [f"{row['time_ratio']:.2f}x ({low:.2f}-{high:.2f})", f"{row['wall_ratio']:.2f}x"]
        lines.append(markdown_row([*cells, row["baseline"], target]))
    table = "\n".join(lines)
    print("\n" + table)
    if args.teacher_output:
        output = Path(args.teacher_output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "results.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2) + "\n")
        (output / "results.md").write_text(
            f"# Teacher terms: cost (issue 30)\n\nCommand:\n\n```bash\n{command}\n```\n\n{header}\n{table}\n"
        )
        print(f"\nwritten: {output / 'results.json'}, {output / 'results.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=["ir", "sts", "mid-nce", "length-aware", "teacher", "all"], default="all")
    parser.add_argument("--model", default=None, help="SentenceTransformer path (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timing rounds (after one warm-up)")
    parser.add_argument("--sts-batch-sizes", type=int, nargs="+", default=[64, 256, 1024, 4096])
    parser.add_argument(
        "--sts-loss-runs", type=int, default=10, help="runs of the vectorised STS loss per run of the loop baseline"
    )
    parser.add_argument("--sts-train-batch-size", type=int, default=32)
    parser.add_argument("--ir-batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--ir-mini-batch-size", type=int, default=32)
    parser.add_argument("--ir-num-negatives", type=int, default=1)
    parser.add_argument("--ir-repeats", type=int, default=3, help="interleaved IR timing rounds (after warm-up)")
    parser.add_argument(
        "--ir-keep-graphs",
        type=int,
        nargs="+",
        default=[1],
        help="keep_graphs values of MultiPositiveCachedInfoNCELoss to measure (the first one also at batch <= mini)",
    )
    parser.add_argument(
        "--ir-autocast",
        choices=["none", "bf16"],
        nargs="+",
        default=None,
        help="autocast modes of the IR rows (default: none and bf16 on CUDA, none on CPU)",
    )
    parser.add_argument(
        "--ir-multi-positive", action="store_true", help="also compare P = 2 against encoding all and looping"
    )
    parser.add_argument(
        "--ir-live-memory",
        action="store_true",
        help="CPU: also measure each peak with a fixed glibc mmap threshold (tracks live tensors, see bench_ir)",
    )
    parser.add_argument("--mid-batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--mid-repeats", type=int, default=3, help="timing rounds of the MidNCE training steps")
    parser.add_argument("--mid-memory-repeats", type=int, default=2, help="fresh processes per MidNCE configuration")
    parser.add_argument(
        "--la-datasets", nargs="+", default=None, help="length-aware: only the row groups of these datasets"
    )
    parser.add_argument(
        "--la-padding-batches",
        type=lambda text: tuple(int(part) for part in text.split("/")),
        nargs="*",
        default=[(64, 16), (256, 32)],
        help="length-aware: BATCH/MINI sizes of the counted (untimed) padding-efficiency table",
    )
    parser.add_argument(
        "--guide", default=None, help="teacher: the guide SentenceTransformer path (default: the model itself)"
    )
    parser.add_argument("--teacher-repeats", type=int, default=9, help="teacher: interleaved timing rounds")
    parser.add_argument(
        "--teacher-output",
        default="benchmarks/results/losses_teacher",
        help="teacher: folder for results.json and results.md ('' = print only)",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one IR measurement, in its own process (see _run_worker)
        config = json.loads(args.worker)
        workers = {
            "time": _ir_time_worker,
            "memory": _ir_memory_worker,
            "mid-nce": _mid_nce_worker,
            "la-time": _length_aware_time_worker,
            "la-memory": _length_aware_memory_worker,
            "teacher-time": _teacher_time_worker,
        }
        worker = workers[config["mode"]]
        print(json.dumps(worker(config)))
        return
    if args.loss in ("ir", "all"):
        bench_ir(args)
    if args.loss in ("sts", "all"):
        bench_sts(args)
    if args.loss in ("mid-nce", "all"):
        bench_mid_nce(args)
    if args.loss == "length-aware":  # not part of "all": it reads the shared training data
        bench_length_aware(args)
    if args.loss == "teacher":  # not part of "all": it reads the shared training data
        bench_teacher(args)


if __name__ == "__main__":
    main()
