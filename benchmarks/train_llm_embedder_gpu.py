"""Train an LLM embedder (decoder, last-token pooling, LoRA optional) with the CoDiEmb losses on GPUs, sharded.

Ready for a GPU machine; not run in this project's CI (no GPU there). What it does:

1. ``--check-gradients`` (under torchrun, 2+ GPUs): shards the model with FSDP2 (``fully_shard`` on every decoder
   layer, then the root) and checks that the cached IR loss and the gathered STS loss give the loss and gradients of
   the unsharded model on the global batch (the CPU test ``tests/losses/test_fsdp.py`` does the same on gloo). Prints the
   largest relative gradient difference; exits 1 above ``--tolerance``.
2. A short training run through ``SentenceTransformerTrainer`` with the chosen ``--sharding`` (DDP, FSDP2 through
   accelerate's FSDP plugin, DeepSpeed ZeRO-1/2): bf16, activation checkpointing, instruction prompts, the
   RoundRobinTaskBatchSampler. Writes losses, step time and peak GPU memory to ``--output`` (JSON).
   ``deepspeed-zero2`` is expected to stop at the first IR step with the loss's clear error (GradCache and ZeRO-2/3
   do not mix, sentence-transformers #3173); the script records that as the expected outcome.

Examples::

    # 2 GPUs: FSDP2 gradient check, then an FSDP2 training run of a random small decoder (no download)
    torchrun --nproc_per_node 2 benchmarks/train_llm_embedder_gpu.py --device cuda --sharding fsdp2 --check-gradients

    # a real model (local folder or hub name), LoRA, DDP
    torchrun --nproc_per_node 4 benchmarks/train_llm_embedder_gpu.py --device cuda --model Qwen/Qwen3-Embedding-0.6B \
        --lora-rank 16 --sharding ddp --max-steps 50

    # smoke test of the script itself on CPU (one process)
    python benchmarks/train_llm_embedder_gpu.py --device cpu --max-steps 2 --no-bf16
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from codiemb_st import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss
from codiemb_st.recipe import build_task_losses, load_task_datasets, training_arguments, training_prompts
from measurement.llm_embedder import (
    QUERY_INSTRUCTION,
    SHARDINGS,
    decoder_layers,
    load_decoder_embedder,
    sharding_arguments,
    synthetic_task_records,
    tiny_decoder_folder,
)

logger = logging.getLogger("train_llm_embedder_gpu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--model", default="tiny", help="A decoder folder or hub name, or 'tiny' (random, offline).")
    parser.add_argument("--sharding", choices=SHARDINGS)
    parser.add_argument("--check-gradients", action="store_true", help="FSDP2 vs unsharded gradients first.")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="Relative gradient tolerance (float32).")
    parser.add_argument("--lora-rank", type=int, default=0, help="Train a LoRA adapter of this rank (0: full).")
    parser.add_argument("--batch-size", type=int, default=32, help="Per-device batch size (IR and STS).")
    parser.add_argument("--mini-batch-size", type=int, default=8, help="GradCache chunk of the IR loss.")
    parser.add_argument("--max-seq-length", type=int, default=128)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--no-bf16", dest="bf16", action="store_false")
    parser.add_argument("--no-activation-checkpointing", dest="activation_checkpointing", action="store_false")
    parser.add_argument("--output", type=Path, default=Path("results/train_llm_embedder_gpu.json"))
    args = parser.parse_args(argv)
    if args.sharding is None:
        args.sharding = "ddp" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "none"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda, but torch sees no GPU (torch.cuda.is_available() is False).")
    return args


# ---------------------------------------------------------------------------------------------------------------------
# 1. FSDP2 gradient check


def check_fsdp2_gradients(args: argparse.Namespace, device: str) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    rank, world_size = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh(device, (world_size,))
    model = load_decoder_embedder(args.model, device, args.max_seq_length, args.lora_rank)
    reference = copy.deepcopy(model)
    batch = args.batch_size * world_size
    ir_records, sts_records = synthetic_task_records(batch, batch, seed=1)
    ir_columns = [[r["query"] for r in ir_records]] + [[r["positives"][k] for r in ir_records] for k in range(2)]
    ir_columns += [[r["negatives"][0] for r in ir_records]]
    sts_columns = [[r["sentence1"] for r in sts_records], [r["sentence2"] for r in sts_records]]
    labels = torch.tensor([r["score"] for r in sts_records], device=device)
    ir_features = [model.tokenize(column) for column in ir_columns]
    sts_features = [model.tokenize(column) for column in sts_columns]
    local = slice(rank * args.batch_size, (rank + 1) * args.batch_size)

    def rows(features):  # this rank's rows of the global tokenization (same padding, hence same positions)
        return [{k: v[local].to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]

    def full(features):
        return [{k: v.to(device) if torch.is_tensor(v) else v for k, v in f.items()} for f in features]

    def run(net, loss_fn, features, labels=None):
        net.zero_grad()
        loss = loss_fn([dict(f) for f in features], labels)
        loss.backward()
        grads = {n: p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad.clone()
                 for n, p in net.named_parameters() if p.grad is not None}  # fmt: skip
        return loss.detach(), grads

    def ir_loss(net, gather):
        return MultiPositiveCachedInfoNCELoss(
            net, num_positives=2, mini_batch_size=args.mini_batch_size, gather_across_devices=gather
        )

    expected = {
        "ir": run(reference, ir_loss(reference, False), full(ir_features)),
        "sts": run(reference, PearsonSpearmanLoss(reference), full(sts_features), labels),
    }
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    actual = {
        "ir": run(model, ir_loss(model, True), rows(ir_features)),
        "sts": run(model, PearsonSpearmanLoss(model, gather_across_devices=True), rows(sts_features), labels[local]),
    }
    report = {}
    for task in ("ir", "sts"):
        loss = actual[task][0].clone()
        dist.all_reduce(loss)
        relative = max(
            ((actual[task][1][n] - g).norm() / g.norm().clamp_min(1e-30)).item() for n, g in expected[task][1].items()
        )
        report[task] = {
            "loss_unsharded": expected[task][0].item(),
            "loss_sharded": loss.item() / world_size,
            "max_relative_grad_difference": relative,
            "passed": relative <= args.tolerance,
        }
    if rank == 0:
        logger.info("FSDP2 gradient check: %s", json.dumps(report))
    return report


# ---------------------------------------------------------------------------------------------------------------------
# 2. Training run


def train(args: argparse.Namespace, device: str) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformerTrainer

    model = load_decoder_embedder(args.model, device, args.max_seq_length, args.lora_rank)
    ir_records, sts_records = synthetic_task_records(args.batch_size * 16, args.batch_size * 16, seed=0)
    data = load_task_datasets(ir={"ir": ir_records}, sts={"sts": sts_records}, num_positives=2, num_negatives=2)
    losses = build_task_losses(model, data, mini_batch_size=args.mini_batch_size, gather_across_devices=True)
    training_args = training_arguments(
        tempfile.mkdtemp(prefix="llm_embedder_run_"),
        data,
        ir_batch_size=args.batch_size,
        sts_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        prompts=training_prompts(data, query=QUERY_INSTRUCTION),
        max_steps=args.max_steps,
        bf16=args.bf16,
        activation_checkpointing=args.activation_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        dataloader_drop_last=True,
        logging_steps=1,
        save_strategy="no",
        use_cpu=device == "cpu",
        **sharding_arguments(args.sharding, model),
    )
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=data.dataset_dict(), loss=losses
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    outcome: dict[str, Any] = {
        "sharding": args.sharding,
        "distributed_type": str(trainer.accelerator.distributed_type),
    }
    try:
        trainer.train()
    except ValueError as error:
        if args.sharding == "deepspeed-zero2" and "Gradient computed twice" in str(error):
            outcome["refused_as_expected"] = str(error)
            return outcome
        raise
    outcome.update(
        {
            "seconds_per_step": (time.perf_counter() - start) / max(1, trainer.state.global_step),
            "losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None,
            "wrapped_model": type(trainer.model_wrapped).__name__,
        }
    )
    return outcome


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    device = args.device
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if args.model == "tiny":
        # Before any process group exists: transformers saves on rank 0 only once one is initialized.
        args.model = str(tiny_decoder_folder(Path(tempfile.mkdtemp(prefix="tiny_decoder_")) / "model"))
    if args.check_gradients:
        if not distributed:
            logger.warning("--check-gradients needs torchrun with 2+ processes; skipped.")
        else:
            dist.init_process_group("nccl" if device == "cuda" else "gloo")
            results["fsdp2_gradient_check"] = check_fsdp2_gradients(args, device)
    results["training"] = train(args, device)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(results, indent=2) + "\n", encoding="utf8")
        logger.info("Wrote %s", args.output)
    check = results.get("fsdp2_gradient_check", {})
    return 0 if all(task["passed"] for task in check.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
