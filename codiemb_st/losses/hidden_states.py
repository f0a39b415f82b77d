"""Hidden-state plumbing for the middle-layer term (MidNCE) of :class:`codiemb_st.losses.PearsonSpearmanLoss`:
find the Transformer and Pooling modules, and request all hidden states for one block of forward calls only.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from codiemb_st._compat import Pooling, Transformer, unwrap_model

# Keys of a model output that belong to the final layer and must not leak into the middle layer's pooling:
# ``cls_token_embeddings`` would make CLS pooling return the final layer's CLS vector.
FINAL_LAYER_KEYS = frozenset(
    {"token_embeddings", "sentence_embedding", "cls_token_embeddings", "all_layer_embeddings"}
)


def hidden_state_modules(model: nn.Module) -> tuple[Transformer, Pooling]:
    """The Transformer module whose hidden states MidNCE reads and the Pooling module that pools them."""
    modules = list(unwrap_model(model).children())
    transformer_index = next((i for i, module in enumerate(modules) if isinstance(module, Transformer)), None)
    if transformer_index is None:
        names = [type(module).__name__ for module in modules]
        raise ValueError(
            "`mid_nce_weight` > 0 needs the hidden states of a sentence-transformers Transformer module, but the "
            f"model has none (modules: {names}). Set `mid_nce_weight=0` to train without the middle-layer InfoNCE term."
        )
    transformer = modules[transformer_index]
    config = getattr(transformer.model, "config", None)
    if config is None or not hasattr(config, "output_hidden_states"):
        raise ValueError(
            f"`mid_nce_weight` > 0 needs hidden states, but the Transformer module's model "
            f"({type(transformer.model).__name__}) has no config with `output_hidden_states`. Set `mid_nce_weight=0`."
        )
    pooling = next((module for module in modules[transformer_index + 1 :] if isinstance(module, Pooling)), None)
    if pooling is None:
        raise ValueError(
            "`mid_nce_weight` > 0 pools the middle layer with the model's Pooling module, but the model has no "
            "Pooling module after its Transformer module. Set `mid_nce_weight=0` to train without the middle-layer term."
        )
    return transformer, pooling


@contextmanager
def hidden_states_requested(transformer: Transformer) -> Iterator[None]:
    """Make the Transformer module return all hidden states for the calls inside the block only.

    sentence-transformers' Transformer module stores ``all_layer_embeddings`` only when the model config has
    ``output_hidden_states`` on (a per-call ``output_hidden_states=True`` reaches the model but its hidden states are
    dropped), so the flag is switched on for this block and restored afterwards, also on error: ``model.encode``,
    other losses and the IR steps never keep every layer. sentence-transformers' own AdaptiveLayerLoss switches the
    same flag the same way.
    """
    config = transformer.model.config
    previous = config.output_hidden_states
    config.output_hidden_states = True
    try:
        yield
    finally:
        config.output_hidden_states = previous


def middle_layer_index(mid_nce_layer: int | None, num_hidden_states: int) -> int:
    """Index into the hidden states of the layer MidNCE pools: ``mid_nce_layer``, or the middle one when None."""
    if mid_nce_layer is None:
        return num_hidden_states // 2
    if not -num_hidden_states <= mid_nce_layer < num_hidden_states:
        raise ValueError(
            f"`mid_nce_layer`={mid_nce_layer} is out of range: the Transformer module returns "
            f"{num_hidden_states} hidden states (the embedding output and {num_hidden_states - 1} layers), so it "
            f"must be in [{-num_hidden_states}, {num_hidden_states - 1}]."
        )
    return mid_nce_layer
