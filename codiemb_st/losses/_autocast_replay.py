"""Replay GradCache mini-batches under the autocast state of the forward pass they replay.

sentence-transformers' ``CachedLossMixin`` embeds every mini-batch twice: once without gradients inside the loss's
forward (under the trainer's ``torch.autocast`` when ``bf16=True``/``fp16=True``) and once with gradients inside
``loss.backward()``, which the trainer calls *outside* the autocast context. The replay therefore ran in float32
(measured on a decoder: bf16 first pass, float32 replay): its activations take twice the memory, it misses the
GPU's bf16 matrix units, and its gradients are those of a float32 forward, not of the bf16 forward whose embeddings
the loss saw. This mixin records the autocast state with each mini-batch's random state (an object that belongs to
that forward pass and travels to its backward pass, so nothing is kept on the loss between the two) and re-enters
it for the replay.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from codiemb_st._compat import RandContext


class AutocastReplayMixin:
    """Put before ``CachedLossMixin`` in the bases of a cached loss; needs ``self.model``."""

    model: Any

    def embed_minibatch(
        self,
        sentence_feature: dict[str, Tensor],
        begin: int,
        end: int,
        with_grad: bool,
        copy_random_state: bool,
        random_state: RandContext | None = None,
    ) -> tuple[Tensor, RandContext | None]:
        """Embed a mini-batch; a replay (``random_state`` given) runs under the autocast state it was recorded with."""
        autocast_state = getattr(random_state, "codiemb_autocast", None)
        context = torch.autocast(**autocast_state) if autocast_state is not None else nullcontext()
        with context:
            reps, new_state = super().embed_minibatch(  # type: ignore[misc]
                sentence_feature, begin, end, with_grad, copy_random_state, random_state
            )
        if new_state is not None:
            device_type = _device_type(self.model)
            if torch.is_autocast_enabled(device_type):
                new_state.codiemb_autocast = {
                    "device_type": device_type,
                    "dtype": torch.get_autocast_dtype(device_type),
                    "cache_enabled": torch.is_autocast_cache_enabled(),
                }
        return reps, new_state


def _device_type(model: Any) -> str:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device.type
    parameter = next(iter(model.parameters()), None)
    return parameter.device.type if parameter is not None else "cpu"


__all__ = ["AutocastReplayMixin"]
