"""The cached IR loss refuses DeepSpeed ZeRO-2/3 (gradient computed twice per partition) with a clear error.

DeepSpeed is not installed here, so the two places the trainer records a DeepSpeed run are simulated: the config
transformers registers for ``TrainingArguments(deepspeed=...)`` and accelerate's DeepSpeed plugin.
"""

from __future__ import annotations

import weakref
from types import SimpleNamespace

import pytest
import torch
import transformers.integrations.deepspeed as hf_deepspeed
from accelerate import state as accelerate_state
from loss_testing import make_ir_columns, tokenize_columns

from codiemb_st import MultiPositiveCachedInfoNCELoss
from codiemb_st.losses._sharding import active_deepspeed_zero_stage


class _Config:  # what transformers' weak reference points to (HfTrainerDeepSpeedConfig has .config)
    def __init__(self, stage):
        self.config = {"zero_optimization": {"stage": stage}}


@pytest.fixture
def deepspeed_config(monkeypatch):
    keep = []

    def register(stage):
        keep.append(_Config(stage))
        monkeypatch.setattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", weakref.ref(keep[-1]))

    return register


def run_step(model):
    loss_fn = MultiPositiveCachedInfoNCELoss(model, num_positives=1, mini_batch_size=2)
    loss = loss_fn(tokenize_columns(model, make_ir_columns(batch_size=4, num_positives=1, num_negatives=0)), None)
    loss.backward()
    return loss


def test_no_deepspeed_means_no_stage():
    assert active_deepspeed_zero_stage() is None


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_2_and_3_are_refused_before_any_gradient(tiny_model, deepspeed_config, stage):
    deepspeed_config(stage)
    assert active_deepspeed_zero_stage() == stage
    with pytest.raises(ValueError, match=f"ZeRO stage {stage}.*Gradient computed twice"):
        run_step(tiny_model)
    assert all(param.grad is None for param in tiny_model.parameters())


def test_zero_1_and_evaluation_are_allowed(tiny_model, deepspeed_config):
    deepspeed_config(1)
    assert torch.isfinite(run_step(tiny_model))
    deepspeed_config(3)
    with torch.no_grad():  # evaluation does not cache gradients
        loss_fn = MultiPositiveCachedInfoNCELoss(tiny_model, num_positives=1)
        loss_fn(tokenize_columns(tiny_model, make_ir_columns(batch_size=4, num_positives=1, num_negatives=0)), None)


def test_accelerate_deepspeed_plugin_is_detected(tiny_model, monkeypatch):
    plugin = SimpleNamespace(zero_stage=2, deepspeed_config={})
    monkeypatch.setattr(accelerate_state, "is_initialized", lambda: True)
    monkeypatch.setattr(accelerate_state, "AcceleratorState", lambda: SimpleNamespace(deepspeed_plugin=plugin))
    assert active_deepspeed_zero_stage() == 2
    with pytest.raises(ValueError, match="FSDP2"):
        run_step(tiny_model)
