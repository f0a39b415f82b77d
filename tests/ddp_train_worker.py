"""torchrun worker for test_ddp_training: a real SentenceTransformerTrainer run on an IR and an STS dataset.

Usage: torchrun --nproc_per_node 2 tests/ddp_train_worker.py MODEL_PATH OUT_DIR
           [--sampler {codiemb,round_robin}] [--grad-accum N] [--sts-loss {pearson_spearman,cosent}]

The IR loss (MultiPositiveCachedInfoNCELoss) gathers across devices; so does the default STS loss
(PearsonSpearmanLoss with gather_across_devices=True), while ``cosent`` (CoSENTLoss) is per device.
``codiemb`` uses RoundRobinTaskBatchSampler; ``round_robin`` uses sentence-transformers' ROUND_ROBIN, which puts
the ranks on different datasets in the same step, so they call different collectives: gloo aborts on the size
mismatch when both losses gather, and the run hangs when only the IR loss does. Every rank writes
OUT_DIR/rank{r}.json: the dataset, batch size and local loss of each forward step, and the trainer's log history.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import MultiDatasetBatchSamplers
from sentence_transformers.sentence_transformer.losses import CoSENTLoss

from codiemb_st import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss, RoundRobinTaskBatchSampler

WORDS = "the quick brown fox jumps over lazy dog a man is playing guitar on stage woman slicing onion".split()


def text(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length)) + f" {i}"


class RecordingTrainer(SentenceTransformerTrainer):
    """Records, per forward step, which dataset this rank got and its local loss."""

    steps: list[dict]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        dataset_name = inputs.get("dataset_name")
        batch_size = next(len(value) for key, value in inputs.items() if key.endswith("input_ids"))
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        value = loss[0] if isinstance(loss, tuple) else loss
        self.steps.append({"dataset": dataset_name, "batch_size": batch_size, "loss": float(value.detach())})
        return loss


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_path")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--sampler", choices=["codiemb", "round_robin"], default="codiemb")
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--sts-loss", choices=["pearson_spearman", "cosent"], default="pearson_spearman")
    args = parser.parse_args()
    model_path, out_dir, grad_accum = args.model_path, args.out_dir, args.grad_accum
    model = SentenceTransformer(model_path, device="cpu")
    train_dataset = DatasetDict(
        {
            "ir": Dataset.from_dict(
                {
                    "anchor": [text(i, 4) for i in range(24)],
                    "positive_1": [text(i + 100, 12) for i in range(24)],
                    "negative_1": [text(i + 200, 12) for i in range(24)],
                }
            ),
            "sts": Dataset.from_dict(
                {
                    "sentence1": [text(i + 300, 6) for i in range(40)],
                    "sentence2": [text(i + 400, 6) for i in range(40)],
                    "score": [(i % 6) / 5 for i in range(40)],
                }
            ),
        }
    )
    loss = {
        "ir": MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=4, gather_across_devices=True),
        "sts": PearsonSpearmanLoss(model, gather_across_devices=True)
        if args.sts_loss == "pearson_spearman"
        else CoSENTLoss(model),
    }
    if args.sampler == "codiemb":
        multi_dataset_batch_sampler = RoundRobinTaskBatchSampler.with_options(
            tasks={"ir": ["ir"], "sts": ["sts"]},
            batch_sizes={"ir": 4, "sts": 6},
            gradient_accumulation_steps=grad_accum,
        )
    else:
        multi_dataset_batch_sampler = MultiDatasetBatchSamplers.ROUND_ROBIN
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out_dir / "checkpoints"),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=grad_accum,
        learning_rate=1e-4,
        multi_dataset_batch_sampler=multi_dataset_batch_sampler,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        seed=0,
        disable_tqdm=True,
        ddp_timeout=60,  # a stuck collective raises after 60 s instead of the default 30 minutes
    )
    trainer = RecordingTrainer(model=model, args=training_args, train_dataset=train_dataset, loss=loss)
    trainer.steps = []
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {"steps": trainer.steps, "log_history": trainer.state.log_history}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))
    # Past this barrier both ranks are done with every collective; the caller leaves with os._exit because tearing
    # down DDP and the gloo group at interpreter exit can deadlock (seen once in this project's 2-rank tests).
    if dist.is_initialized():
        dist.barrier()
    return 0


if __name__ == "__main__":
    faulthandler.dump_traceback_later(150, exit=True)  # watchdog: never outlive the test's timeout
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
