"""The sampler's epoch plan as pure arithmetic (codiemb_st.epoch_plan), without a torch sampler."""

from __future__ import annotations

import pytest

from codiemb_st.epoch_plan import plan_epoch


def test_plan_counts_steps_drops_and_cycles_the_smaller_task() -> None:
    plan = plan_epoch(
        {"scifact": 100, "snli": 37, "stsb": 50},
        {"scifact": "ir", "snli": "ir", "stsb": "sts"},
        {"scifact": 8, "snli": 8, "stsb": 16},
        world_size=2,
        gradient_accumulation_steps=1,
    )
    assert plan.batches_per_step == 2
    assert plan.task_names == ("ir", "sts")
    assert plan.steps_per_dataset == {"scifact": 6, "snli": 2, "stsb": 1}
    assert plan.dropped_per_pass == {"scifact": 4, "snli": 5, "stsb": 18}
    assert plan.steps_per_task == {"ir": 8, "sts": 1}
    assert plan.steps_per_epoch == 16  # two tasks x the larger task's 8 steps
    assert plan.num_batches == 32
    assert plan.batch_size is None  # mixed batch sizes


def test_plan_single_batch_size_and_gradient_accumulation() -> None:
    plan = plan_epoch({"a": 12, "b": 13}, {"a": "x", "b": "x"}, {"a": 3, "b": 3}, gradient_accumulation_steps=2)
    assert plan.steps_per_dataset == {"a": 2, "b": 2}
    assert plan.dropped_per_pass == {"a": 0, "b": 1}
    assert plan.steps_per_epoch == 4
    assert plan.batch_size == 3


def test_plan_refuses_a_dataset_smaller_than_one_step() -> None:
    with pytest.raises(ValueError, match=r"Dataset 'b' \(task 'sts'\) has 7 rows, fewer than one step needs: .* = 8"):
        plan_epoch({"a": 100, "b": 7}, {"a": "ir", "b": "sts"}, {"a": 4, "b": 4}, world_size=2)
