"""Training fault tolerance: a run resumed from a mid-epoch checkpoint ends with the uninterrupted run's weights, and a
4-rank gloo run with both gathering losses finishes (under a watchdog) with the same dataset at every step on every
rank."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, DatasetDict
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from tiny_model import save_tiny_model
from torchrun_harness import run_torchrun

from codiemb_st import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss, RoundRobinTaskBatchSampler

WORKER = Path(__file__).with_name("ddp_train_worker.py")
WORDS = "the quick brown fox jumps over lazy dog a man is playing guitar on stage woman slicing onion".split()
SAVE_STEPS = 7  # epochs are 12 steps long: checkpoint-7 lies in the middle of the first epoch


def _text(i: int, length: int) -> str:
    return " ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(length)) + f" {i}"


def _train_dataset() -> DatasetDict:
    return DatasetDict(
        {
            "ir": Dataset.from_dict(
                {
                    "anchor": [_text(i, 4) for i in range(24)],
                    "positive_1": [_text(i + 100, 10) for i in range(24)],
                    "negative_1": [_text(i + 200, 10) for i in range(24)],
                }
            ),
            "sts": Dataset.from_dict(
                {
                    "sentence1": [_text(i + 300, 6) for i in range(24)],
                    "sentence2": [_text(i + 400, 6) for i in range(24)],
                    "score": [(i % 6) / 5 for i in range(24)],
                }
            ),
        }
    )


@pytest.fixture(scope="module")
def model_with_dropout(tmp_path_factory) -> Path:
    # Dropout on, so that resuming must also restore the RNG state (GradCache replays it within a step).
    return save_tiny_model(tmp_path_factory.mktemp("resume") / "model", seed=0, dropout=0.1)


def _trainer(model_path: Path, output_dir: Path) -> SentenceTransformerTrainer:
    # Loaded from its folder, as the trainer loads a checkpoint when resuming: the reloaded BERT has a pooler (its
    # config does not record add_pooling_layer=False), so the model trained from the start must have one too.
    torch.manual_seed(0)
    model = SentenceTransformer(str(model_path), device="cpu")
    loss = {
        "ir": MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=3),
        "sts": PearsonSpearmanLoss(model),
    }
    args = SentenceTransformerTrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=2,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        multi_dataset_batch_sampler=RoundRobinTaskBatchSampler.with_options(
            tasks={"ir": ["ir"], "sts": ["sts"]}, batch_sizes={"ir": 4, "sts": 6}
        ),
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_steps=100,
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    return SentenceTransformerTrainer(model=model, args=args, train_dataset=_train_dataset(), loss=loss)


def _weights(trainer: SentenceTransformerTrainer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in trainer.model.state_dict().items()}


def test_resume_from_a_mid_epoch_checkpoint_gives_the_uninterrupted_weights(model_with_dropout, tmp_path):
    uninterrupted = _trainer(model_with_dropout, tmp_path / "a")
    initial = _weights(uninterrupted)
    uninterrupted.train()
    expected = _weights(uninterrupted)
    # 2 epochs x (6 IR steps of 4 + 6 STS steps of 6, the STS task cycling to keep up): 24 optimizer steps.
    assert uninterrupted.state.global_step == 24
    checkpoint = tmp_path / "a" / f"checkpoint-{SAVE_STEPS}"
    assert checkpoint.is_dir()

    resumed = _trainer(model_with_dropout, tmp_path / "b")
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 24
    got = _weights(resumed)

    assert any(not torch.equal(initial[name], expected[name]) for name in expected)  # training changed the model
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.distributed
def test_four_rank_run_with_both_gathering_losses_finishes_with_equal_dataset_sequences(tiny_model_path, tmp_path):
    # The harness kills torchrun after `timeout` (and the workers dump their stacks after 150 s): a deadlock fails.
    result = run_torchrun(WORKER, [tiny_model_path, tmp_path], tmp_path / "torchrun.log", timeout=240, nproc=4)
    assert result.returncode == 0, result.stdout[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]

    # 2 epochs x (1 IR step: 24 rows / (4 ranks x 4) + 1 STS step: 40 rows / (4 ranks x 6)), tasks alternating.
    sequences = [[(step["dataset"], step["batch_size"]) for step in rank["steps"]] for rank in ranks]
    assert sequences[0] == [("ir", 4), ("sts", 6)] * 2
    assert all(sequence == sequences[0] for sequence in sequences)
    losses = [[entry["loss"] for entry in rank["log_history"] if "loss" in entry] for rank in ranks]
    assert len(losses[0]) == 4 and all(rank_losses == losses[0] for rank_losses in losses)
    # The gathered STS loss is one global value on every rank.
    sts = [[step["loss"] for step in rank["steps"] if step["dataset"] == "sts"] for rank in ranks]
    assert all(rank_sts == pytest.approx(sts[0], abs=1e-6) for rank_sts in sts)
