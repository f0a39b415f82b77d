"""Run under ``torchrun --nproc_per_node 2`` (gloo, CPU) by evaluation/test_evaluation_ddp.py; writes ``rank<r>.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset
from evaluation_fixtures import STS_PAIRS
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

import codiemb_st.evaluation.mteb_evaluator as mteb_evaluator_module
from codiemb_st.evaluation import MTEBEvaluator


def main(model_path: str, data_dir: str, out_dir: str) -> None:
    # The training arguments set up the process group (gloo on CPU); a group created here and destroyed after the
    # trainer makes the process abort at exit ("terminate called without an active exception"), evaluator or not.
    args = SentenceTransformerTrainingArguments(
        output_dir=str(Path(out_dir) / "train"),
        max_steps=2,
        per_device_train_batch_size=3,
        learning_rate=1e-2,
        eval_strategy="steps",
        eval_steps=2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_find_unused_parameters=True,
    )
    assert dist.is_initialized() and dist.get_world_size() == 2
    rank = dist.get_rank()
    model = SentenceTransformer(model_path, device="cpu")
    evaluator = MTEBEvaluator(["TinySTS", "TinyRetrieval"], data_dir=data_dir)
    record = {"standalone": evaluator(model)}

    # An error on rank 0 must reach every rank instead of leaving the others waiting in the broadcast.
    original = mteb_evaluator_module.evaluate_model
    if rank == 0:

        def boom(*args, **kwargs):
            raise ValueError("boom on rank 0")

        mteb_evaluator_module.evaluate_model = boom
    try:
        evaluator(model)
        record["error"] = None
    except Exception as error:
        record["error"] = f"{type(error).__name__}: {error}"
    mteb_evaluator_module.evaluate_model = original

    train = Dataset.from_dict({"anchor": [a for a, _, _ in STS_PAIRS], "positive": [b for _, b, _ in STS_PAIRS]})
    trainer = SentenceTransformerTrainer(
        model=model, args=args, train_dataset=train, loss=MultipleNegativesRankingLoss(model), evaluator=evaluator
    )
    trainer.train()
    record["trainer"] = next(entry for entry in trainer.state.log_history if "eval_mteb_mean_task" in entry)
    record["final"] = evaluator(model)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    # Both ranks are past every collective here. Tearing down DDP and gloo at interpreter exit aborted once on this
    # loaded 2-core machine ("terminate called without an active exception"), as for the other workers: leave with
    # os._exit after a barrier.
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:4])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
