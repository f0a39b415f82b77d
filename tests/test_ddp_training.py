"""A real 4-process DDP training run (torchrun, gloo, CPU) with RoundRobinTaskBatchSampler must not deadlock."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torchrun_harness import run_torchrun

WORKER = Path(__file__).with_name("ddp_train_worker.py")
REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.distributed
def test_four_rank_training_with_gathering_losses_finishes_with_equal_dataset_sequences(tiny_model_path, tmp_path):
    # The harness kills torchrun after `timeout` (and the workers dump their stacks after 150 s): a deadlock fails.
    result = run_torchrun(
        WORKER, [tiny_model_path, tmp_path, "--sampler", "codiemb"], tmp_path / "torchrun.log", timeout=240, nproc=4
    )
    assert result.returncode == 0, result.stdout[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(4)]

    # 2 epochs x (1 IR step: 24 rows / (4 ranks x 4) + 1 STS step: 40 rows / (4 ranks x 6)), tasks alternating.
    steps = [[(step["dataset"], step["batch_size"]) for step in rank["steps"]] for rank in ranks]
    assert steps[0] == [("ir", 4), ("sts", 6)] * 2
    assert all(sequence == steps[0] for sequence in steps)

    losses = [[entry["loss"] for entry in rank["log_history"] if "loss" in entry] for rank in ranks]
    assert len(losses[0]) == 4 and all(rank_losses == losses[0] for rank_losses in losses)
    # The logged losses are the trainer's cross-rank mean: the local IR losses differ between ranks (each rank
    # scores its own queries against the gathered candidates), the gathered STS loss is one global value.
    local = {
        task: [[step["loss"] for step in rank["steps"] if step["dataset"] == task] for rank in ranks]
        for task in ("ir", "sts")
    }
    assert len({tuple(rank_ir) for rank_ir in local["ir"]}) == 4
    assert all(rank_sts == pytest.approx(local["sts"][0], abs=1e-6) for rank_sts in local["sts"])
