"""torchrun worker for test_ddp_training: a real SentenceTransformerTrainer run on an IR and an STS dataset.

Usage: torchrun --nproc_per_node 2 tests/ddp_train_worker.py MODEL_PATH OUT_DIR {codiemb,round_robin} [GRAD_ACCUM]

``codiemb`` uses RoundRobinTaskBatchSampler; ``round_robin`` uses sentence-transformers' ROUND_ROBIN, which puts
the ranks on different datasets in the same step (with a gathering IR loss: a hang). Every rank writes
OUT_DIR/rank{r}.json: the dataset, batch size and local loss of each forward step, and the trainer's log history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from sentence_transformers.base.sampler import MultiDatasetBatchSamplers
from sentence_transformers.sentence_transformer.losses import CoSENTLoss

from codiemb_st import MultiPositiveCachedInfoNCELoss, RoundRobinTaskBatchSampler

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


def main() -> None:
    model_path, out_dir, sampler = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    grad_accum = int(sys.argv[4]) if len(sys.argv) > 4 else 1
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
        "sts": CoSENTLoss(model),
    }
    if sampler == "codiemb":
        multi_dataset_batch_sampler = RoundRobinTaskBatchSampler.with_options(
            tasks={"ir": ["ir"], "sts": ["sts"]},
            batch_sizes={"ir": 4, "sts": 6},
            gradient_accumulation_steps=grad_accum,
        )
    else:
        multi_dataset_batch_sampler = MultiDatasetBatchSamplers.ROUND_ROBIN
    args = SentenceTransformerTrainingArguments(
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
    )
    trainer = RecordingTrainer(model=model, args=args, train_dataset=train_dataset, loss=loss)
    trainer.steps = []
    trainer.train()
    rank = dist.get_rank() if dist.is_initialized() else 0
    result = {"steps": trainer.steps, "log_history": trainer.state.log_history}
    (out_dir / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
