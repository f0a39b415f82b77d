"""Detect sharded-training set-ups that gradient caching cannot work with, and fail clearly instead of wrongly.

GradCache (sentence-transformers' ``CachedLossMixin``) back-propagates one mini-batch at a time, inside the outer
``loss.backward()``, so every parameter receives several gradient contributions per optimizer step. DeepSpeed ZeRO
stage 2 and 3 reduce and partition each parameter's gradient the moment it is produced and assert that this happens
once per step: the run stops with ``AssertionError: The parameter ... has already been reduced. Gradient computed
twice for this partition. Multiple gradient reduction is currently not supported`` (sentence-transformers issue
#3173; tevatron #206 for ZeRO-3), or, with the check compiled out, would reduce partial gradients. ZeRO-1 only
partitions optimizer states and reduces gradients once after the backward pass, so it works; so does FSDP2
(``fully_shard``), whose per-backward reduce-scatter accumulates into the sharded gradient (tested on 2 gloo CPU
ranks, see docs/llm-embedders.md). This module finds the ZeRO stage of the current run so the cached losses can refuse
stages 2/3 at their first training step, before any gradient is touched.
"""

from __future__ import annotations

from typing import Any

from accelerate import state as accelerate_state


def active_deepspeed_zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage of the current run, or None when DeepSpeed is not in use.

    Looks where the sentence-transformers trainer puts it: the DeepSpeed configuration that transformers registers
    for ``TrainingArguments(deepspeed=...)``, and accelerate's DeepSpeed plugin (``accelerate launch`` with a
    DeepSpeed config). Neither needs the ``deepspeed`` package to be imported here.
    """
    stage = _stage_from_config(_transformers_deepspeed_config())
    if stage is not None:
        return stage
    if accelerate_state.is_initialized():
        plugin = getattr(accelerate_state.AcceleratorState(), "deepspeed_plugin", None)
        if plugin is not None:
            stage = getattr(plugin, "zero_stage", None)
            if stage is None:
                stage = _stage_from_config(getattr(plugin, "deepspeed_config", None))
            return None if stage is None else int(stage)
    return None


def _transformers_deepspeed_config() -> dict[str, Any] | None:
    try:
        from transformers.integrations.deepspeed import deepspeed_config
    except ImportError:  # a transformers build without the DeepSpeed integration
        return None
    return deepspeed_config()


def _stage_from_config(config: Any) -> int | None:
    if not isinstance(config, dict):
        return None
    stage = (config.get("zero_optimization") or {}).get("stage")
    # "auto" is resolved by accelerate from its plugin; only a number is a decision.
    return int(stage) if isinstance(stage, (int, float)) and not isinstance(stage, bool) else None


def check_gradient_caching_supported(loss_name: str) -> None:
    """Raise if the current run shards gradients in a way gradient caching cannot work with.

    Args:
        loss_name: The loss, for the message.

    Raises:
        ValueError: Under DeepSpeed ZeRO stage 2 or 3.
    """
    stage = active_deepspeed_zero_stage()
    if stage is not None and stage >= 2:
        raise ValueError(
            f"{loss_name} uses gradient caching, which back-propagates every mini-batch separately, but DeepSpeed "
            f"ZeRO stage {stage} (zero_optimization.stage={stage}) reduces each gradient once per step and stops with "
            "'Gradient computed twice for this partition' (sentence-transformers issue #3173). Use ZeRO stage 1, "
            "FSDP2 (accelerate's FSDP plugin with fsdp_version=2) or DDP with this loss."
        )


__all__ = ["active_deepspeed_zero_stage", "check_gradient_caching_supported"]
