"""What may differ between merge inputs, and what may not: the rules behind
:func:`~codiemb_st.merging.model_folder.check_compatible`.

Inputs are compatible when their architecture, module types and tensor names and shapes agree; then their weights
can be averaged. Everything else is a *setting* of one model, and the merged model takes ``checkpoints[0]``'s (its
files are copied whole), with a warning naming the key, each input's value and the value taken:

- **The Transformer's ``config.json``**: a key that changes the tensors or the computation (``model_type``,
  ``architectures``, hidden sizes, layer and head counts, vocabulary size, activation, ...) is an *architecture* key
  and a difference is refused. A key that only records provenance or a run-time switch (:data:`INCIDENTAL_KEYS`,
  any key starting with ``_``, dropout rates, label maps, token ids; the tokenizer vocabulary is checked on its own)
  is *incidental*. A key one file lacks takes the transformers default of its ``model_type`` first: a base saved by
  an older transformers has no ``is_decoder``, which is the default ``False`` a newer one writes.
- **Modules without weights** (Pooling, Normalize, ...), the Transformer's ``sentence_bert_config.json`` and the
  model's prompts (``config_sentence_transformers.json``): settings, warned about. Pooling configurations are
  compared as sentence-transformers reads them (the legacy ``pooling_mode_*_tokens`` flags of older versions are
  the ``pooling_mode`` of newer ones; ``include_prompt`` defaults to ``True``).
- **Configurations of other modules with weights** (Dense: ``activation_function``, ``bias``, ...): part of their
  computation, so a difference is refused.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

logger = logging.getLogger("codiemb_st.merging.model_folder")

#: ``config.json`` keys that record provenance or switch run-time behaviour the weights do not depend on.
INCIDENTAL_KEYS = frozenset(
    {
        # provenance
        "transformers_version",
        "dtype",
        "torch_dtype",
        # run-time switches (outputs returned, caching, memory-saving options with the same results)
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "torchscript",
        "gradient_checkpointing",
        "chunk_size_feed_forward",
        "attn_implementation",
        # training-time settings and task heads the encoder's weights do not use
        "initializer_range",
        "initializer_factor",
        "id2label",
        "label2id",
        "num_labels",
        "problem_type",
        "finetuning_task",
        "tokenizer_class",
        "prefix",
        "task_specific_params",
    }
)

#: Legacy Pooling flags (sentence-transformers < 5) -> the ``pooling_mode`` they mean, in the order they concatenate.
LEGACY_POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean",
    "pooling_mode_lasttoken": "lasttoken",
}

#: The defaults of ``sentence_bert_config.json`` keys that sentence-transformers < 5 did not write.
TRANSFORMER_DEFAULTS = {
    "do_lower_case": False,
    "transformer_task": "feature-extraction",
    "module_output_name": "token_embeddings",
}
#: The ``modality_config`` of a text ``feature-extraction`` Transformer (the default of that task).
FEATURE_EXTRACTION_MODALITIES = {"text": {"method": "forward", "method_output_name": "last_hidden_state"}}

#: The keys of ``config_sentence_transformers.json`` that are settings of the model (the rest records versions).
MODEL_SETTING_KEYS = ("prompts", "default_prompt_name", "similarity_fn_name")

Difference = tuple[Any, Any]


def is_incidental_key(key: str) -> bool:
    """Whether a ``config.json`` key may differ between merge inputs (see the module docstring)."""
    return (
        key in INCIDENTAL_KEYS
        or key.startswith("_")
        or "dropout" in key  # dropout rates act in training only
        or key.endswith("_token_id")  # token ids are the tokenizer's, whose vocabulary is compared on its own
    )


@functools.cache
def config_defaults(model_type: str) -> dict[str, Any]:
    """The defaults transformers writes into ``config.json`` for ``model_type`` (empty when it does not know it)."""
    try:
        from transformers import AutoConfig

        defaults = AutoConfig.for_model(model_type).to_dict()
    except Exception:  # an unknown or remote-code model type: compare the keys as written
        return {}
    return {key: value for key, value in defaults.items() if key != "model_type"}


def with_defaults(config: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``config`` with the keys only ``other`` has filled in from the transformers defaults of its model type."""
    model_type = config.get("model_type")
    defaults = config_defaults(model_type) if isinstance(model_type, str) else {}
    return {**{key: defaults[key] for key in other.keys() - config.keys() if key in defaults}, **config}


def normalised_config(config: dict[str, Any]) -> dict[str, Any] | None:
    """``config`` as transformers reads it today (its config class fills defaults and renames legacy keys, e.g.
    ``rope_theta`` into ``rope_parameters``), or None when transformers cannot read it (an unknown model type)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.for_model(**config).to_dict()
    except Exception:  # remote-code model types, values the class refuses: compare the keys as written
        return None


def config_differences(reference: dict[str, Any], other: dict[str, Any]) -> tuple[dict[str, Difference], ...]:
    """The differing keys of two Transformer ``config.json`` objects: ``(architecture, incidental)``.

    Each maps a key to ``(reference value, other value)``; a key one file lacks (and that has no default) is
    :data:`MISSING` on that side. Architecture keys are compared as transformers reads the files
    (:func:`normalised_config`), so files written by different transformers versions for the same model agree;
    incidental keys as written (with the defaults of missing keys), so their values are reported as they are.
    """
    written = with_defaults(reference, other), with_defaults(other, reference)
    normalised = normalised_config(reference), normalised_config(other)
    read = normalised if None not in normalised else written
    architecture: dict[str, Difference] = {}
    for key in sorted(read[0].keys() | read[1].keys()):
        a, b = read[0].get(key, MISSING), read[1].get(key, MISSING)
        if a != b and not is_incidental_key(key):
            architecture[key] = (a, b)
    incidental: dict[str, Difference] = {}
    for key in sorted(written[0].keys() | written[1].keys()):
        a, b = written[0].get(key, MISSING), written[1].get(key, MISSING)
        if a != b and is_incidental_key(key):
            incidental[key] = (a, b)
    return architecture, incidental


class _Missing:
    def __repr__(self) -> str:
        return "(not set)"


#: A key a configuration does not have.
MISSING: Any = _Missing()


def pooling_settings(config: Any) -> Any:
    """A Pooling ``config.json`` as sentence-transformers reads it: legacy flags become ``pooling_mode``,
    ``word_embedding_dimension`` is ``embedding_dimension``, ``include_prompt`` defaults to ``True``."""
    if not isinstance(config, dict):
        return config
    settings = {key: value for key, value in config.items() if key not in LEGACY_POOLING_FLAGS}
    if "word_embedding_dimension" in settings:
        settings.setdefault("embedding_dimension", settings.pop("word_embedding_dimension"))
        settings.pop("word_embedding_dimension", None)
    if "pooling_mode" not in settings:
        modes = [mode for flag, mode in LEGACY_POOLING_FLAGS.items() if config.get(flag)] or ["mean"]
        settings["pooling_mode"] = modes[0] if len(modes) == 1 else modes
    elif isinstance(settings["pooling_mode"], (list, tuple)):
        modes = list(settings["pooling_mode"])
        settings["pooling_mode"] = modes[0] if len(modes) == 1 else modes
    settings.setdefault("include_prompt", True)
    return settings


def settings_differences(reference: Any, other: Any, *, skip_absent: bool = True) -> dict[str, Difference]:
    """The differing keys of two JSON settings (a whole value under ``""`` when they are not both objects).

    Args:
        reference: The settings of the input the merged model takes them from.
        other: Another input's.
        skip_absent: Leave out keys only one side has (a missing file is ``{}``): a version that did not write a key
            loads it with the default, which only the module knows. Normalise known defaults first
            (:func:`pooling_settings`, :func:`transformer_settings`).
    """
    if skip_absent:
        reference = {} if reference is None else reference
        other = {} if other is None else other
    if not (isinstance(reference, dict) and isinstance(other, dict)):
        return {} if reference == other else {"": (reference, other)}
    keys = reference.keys() & other.keys() if skip_absent else reference.keys() | other.keys()
    return {
        key: (reference.get(key, MISSING), other.get(key, MISSING))
        for key in sorted(keys)
        if reference.get(key, MISSING) != other.get(key, MISSING)
    }


def transformer_settings(config: Any, tokenizer_config: Any) -> Any:
    """A Transformer's ``sentence_bert_config.json`` as sentence-transformers 6 reads it: the defaults of the keys
    older versions did not write, and ``max_seq_length`` from the tokenizer's ``model_max_length`` where newer ones
    keep it (the file's own ``max_seq_length`` wins, as it does when loading)."""
    if not isinstance(config, dict):
        return config
    settings = {**TRANSFORMER_DEFAULTS, **config}
    if settings["transformer_task"] == "feature-extraction":
        settings.setdefault("modality_config", FEATURE_EXTRACTION_MODALITIES)
    if "max_seq_length" not in settings and isinstance(tokenizer_config, dict):
        if "model_max_length" in tokenizer_config:
            settings["max_seq_length"] = tokenizer_config["model_max_length"]
    return settings


def describe(differences: dict[str, Difference], reference: str, other: str, limit: int = 8) -> str:
    """``"key: value in reference vs value in other; ..."`` for a message (at most ``limit`` keys)."""
    parts = [
        f"{key or 'the whole file'}: {_short(a)} in {reference} vs {_short(b)} in {other}"
        for key, (a, b) in list(differences.items())[:limit]
    ]
    more = len(differences) - limit
    return "; ".join(parts) + (f"; and {more} more" if more > 0 else "")


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value) if value is MISSING else json.dumps(value, ensure_ascii=False, default=repr)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def warn_settings(
    differences: dict[str, Difference],
    what: str,
    reference: tuple[str, str],
    other: tuple[str, str],
    *,
    file: str,
    level: int = logging.WARNING,
) -> None:
    """Log that ``what`` differs between two inputs, which value the merged model takes and how to choose another.

    Args:
        differences: Key -> (``reference``'s value, ``other``'s value).
        what: What differs, e.g. ``"the Pooling settings (1_Pooling/config.json)"``.
        reference: ``(role, path)`` of the input whose files the merged model takes (``checkpoints[0]``).
        other: ``(role, path)`` of the other input.
        file: The output file to edit to take the other value instead.
        level: ``logging.WARNING`` for checkpoints; the base's settings are never used, so INFO for it.
    """
    if not differences:
        return
    (ref_role, ref_path), (other_role, other_path) = reference, other
    taken = ", ".join(f"{key or 'all'}={_short(a)}" for key, (a, _) in differences.items())
    if level >= logging.WARNING:
        advice = f"To take {other_role}'s instead, list it first, or edit {file} of the output."
    else:
        advice = "The base's settings are never used, only its weights."
    logger.log(
        level,
        f"{what} differ between {ref_role} ({ref_path}) and {other_role} ({other_path}): "
        f"{describe(differences, ref_role, other_role)}. The merged model takes {ref_role}'s ({taken}). {advice}",
    )


__all__ = [
    "INCIDENTAL_KEYS",
    "LEGACY_POOLING_FLAGS",
    "MISSING",
    "MODEL_SETTING_KEYS",
    "config_defaults",
    "config_differences",
    "describe",
    "is_incidental_key",
    "normalised_config",
    "pooling_settings",
    "settings_differences",
    "transformer_settings",
    "warn_settings",
    "with_defaults",
]
