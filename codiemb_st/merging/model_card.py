"""The model card (README.md) of a merged model folder: sentence-transformers' card layout and Hub metadata.

A checkpoint's own README.md describes its training, not the merge, so it is never copied into a merged folder; this
card replaces it. Its YAML front matter is what the Hugging Face Hub and sentence-transformers read
(``library_name: sentence-transformers``, ``pipeline_tag``, ``tags`` with ``merge`` and the method's name,
``base_model``); its body names the method and its parameters, every input with its weight (where the method has one
weight per checkpoint) and the hash ``merge_config.json`` records, the model's modules and the loading snippet.

``base_model`` is the base model the merge was given, else the base the checkpoints record (the ``base_model`` of
their own model cards, or a LoRA adapter's ``base_model_name_or_path``). A local folder is written as the path it was
given: put the Hub id there before pushing the model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData

logger = logging.getLogger(__name__)

#: The card file of a model folder (what the Hub shows and ``ModelCard.load`` reads).
CARD_NAME = "README.md"


def recorded_base_model(folder: Path) -> str | None:
    """The base model a checkpoint folder records: its card's ``base_model`` (sentence-transformers writes it when
    the model was fine-tuned from a Hub model), else a LoRA adapter's ``base_model_name_or_path``; None when neither.

    Example:
        ::

            recorded_base_model(Path("runs/seed1/final"))  # "sentence-transformers/all-MiniLM-L6-v2"
    """
    card = folder / CARD_NAME
    if card.is_file():
        try:
            base = ModelCard.load(card).data.base_model
        except Exception:  # a hand-written README without metadata, malformed YAML: the card is optional
            base = None
        if base:
            return base if isinstance(base, str) else ", ".join(base)
    for config in sorted(folder.rglob("adapter_config.json")):
        try:
            name = json.loads(config.read_text(encoding="utf8")).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(name, str) and name:
            return name
    return None


def card_base_model(base: str | None, checkpoint_bases: list[str | None]) -> str | list[str] | None:
    """The card's ``base_model``: ``base`` when given, else the checkpoints' recorded bases (one, or a list)."""
    if base:
        return base
    recorded = list(dict.fromkeys(name for name in checkpoint_bases if name))
    if not recorded:
        return None
    return recorded[0] if len(recorded) == 1 else recorded


def merged_model_card(
    folder: Path,
    record: dict[str, Any],
    *,
    method_name: str,
    inputs: list[str],
    weights: list[float] | None,
    base_model: str | list[str] | None,
    base_label: str | None,
) -> ModelCard:
    """The model card of the merged model in ``folder`` (its modules and settings are read from there).

    Args:
        folder: The merged model folder (its ``modules.json``, ``sentence_bert_config.json`` and
            ``config_sentence_transformers.json`` describe the model).
        record: What ``merge_config.json`` records (``method``, ``parameters``, ``checkpoints``, ``base_model``).
        method_name: The method's registered name (``codiemb-st merge --method NAME``), a tag of the card.
        inputs: How each checkpoint was given (a path, or ``checkpoints[i]`` for a model object).
        weights: One weight per checkpoint, or None when the method weighs them per tensor or per parameter.
        base_model: The card's ``base_model`` metadata (see :func:`card_base_model`).
        base_label: How the base model was given (None without one).

    Returns:
        The card; ``card.save(path)`` writes it.

    Example:
        ::

            card = merged_model_card(folder, record, method_name="model_soup", inputs=["a", "b"],
                                     weights=[0.5, 0.5], base_model=None, base_label=None)
            card.save(folder / "README.md")
    """
    tags = ["sentence-transformers", "sentence-similarity", "feature-extraction", "merge", method_name, "codiemb-st"]
    data = ModelCardData(
        base_model=base_model,
        library_name="sentence-transformers",
        pipeline_tag="sentence-similarity",
        tags=list(dict.fromkeys(tags)),
    )
    method = record["method"]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {method} merge of {len(inputs)} sentence-transformers checkpoint{'s' if len(inputs) != 1 else ''}",
        "",
        f"This is a [sentence-transformers](https://www.SBERT.net) model merged with `codiemb-st merge --method "
        f"{method_name}` ({method}): its weights are computed from the checkpoints below, tensor by tensor; its "
        f"modules, tokenizer, prompts and settings are those of {record.get('settings_from', 'checkpoints[0]')}.",
        "",
        "## Merge Details",
        "",
        "### Inputs",
        "",
        "| Input | Model | Weight | Weights SHA-256 |",
        "|:------|:------|-------:|:----------------|",
    ]
    for index, (label, entry) in enumerate(zip(inputs, record["checkpoints"])):
        weight = "per tensor or parameter" if weights is None else f"{weights[index]:.6g}"
        lines.append(f"| checkpoints[{index}] | `{label}` | {weight} | `{entry['weights_sha256'][:16]}…` |")
    base_record = record.get("base_model")
    if base_record is not None and base_label is not None:
        use = "the deltas θ_c − θ_0 are taken from it" if base_record.get("used") else "checked, not used"
        lines.append(f"| base model | `{base_label}` | {use} | `{base_record['weights_sha256'][:16]}…` |")
    lines += [
        "",
        f"### Method: {method}",
        "",
        "Parameters (also in `merge_config.json`, with every input's path and hash):",
        "",
        "```json",
        json.dumps(record["parameters"], indent=4, ensure_ascii=False),
        "```",
        "",
        "## Model Details",
        "",
        *_model_details(folder),
        "",
        "## Usage",
        "",
        "### Direct Usage (Sentence Transformers)",
        "",
        "First install the Sentence Transformers library:",
        "",
        "```bash",
        "pip install -U sentence-transformers",
        "```",
        "",
        "Then you can load this model and run inference.",
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        "",
        "# Download from the 🤗 Hub, or give the merged model's folder",
        'model = SentenceTransformer("sentence_transformers_model_id")',
        "sentences = [",
        '    "The weather is lovely today.",',
        '    "It\'s so sunny outside!",',
        '    "He drove to the stadium.",',
        "]",
        "embeddings = model.encode(sentences)",
        "print(embeddings.shape)",
        "",
        "# Get the similarity scores for the embeddings",
        "similarities = model.similarity(embeddings, embeddings)",
        "print(similarities)",
        "```",
        "",
    ]
    return ModelCard("\n".join(lines))


def _model_details(folder: Path) -> list[str]:
    """The model's modules and settings, read from its files (the model is not loaded)."""
    details = ["- **Model Type:** Sentence Transformer"]
    modules = _read_json(folder / "modules.json") or []
    transformer = _read_json(folder / "sentence_bert_config.json") or {}
    if isinstance(transformer, dict) and transformer.get("max_seq_length"):
        details.append(f"- **Maximum Sequence Length:** {transformer['max_seq_length']} tokens")
    settings = _read_json(folder / "config_sentence_transformers.json") or {}
    similarity = settings.get("similarity_fn_name") if isinstance(settings, dict) else None
    details.append(f"- **Similarity Function:** {similarity or 'cosine'}")
    if isinstance(settings, dict) and settings.get("prompts"):
        details.append(f"- **Prompts:** {', '.join(f'`{name}`' for name in settings['prompts'])}")
    if isinstance(modules, list) and modules:
        kinds = [str(module.get("type", "?")).rsplit(".", 1)[-1] for module in modules if isinstance(module, dict)]
        details.append(f"- **Modules:** {' → '.join(kinds)}")
    return details


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf8"))
    except (OSError, ValueError):
        return None


__all__ = ["CARD_NAME", "card_base_model", "merged_model_card", "recorded_base_model"]
