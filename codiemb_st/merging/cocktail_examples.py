"""The example data of :class:`~codiemb_st.merging.cocktail.CocktailSoup`: read example files (IR records or STS
pairs), and score a model on them with its task loss, as a whole or per layer group."""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from datasets import Dataset

    from codiemb_st._compat import SentenceTransformer

logger = logging.getLogger("codiemb_st.merging.cocktail")

#: The fewest examples a file must hold to score a candidate (a contrastive loss needs an in-batch negative; a
#: correlation needs two pairs).
MIN_EXAMPLES = 2


@dataclass
class ExampleSet:
    """The examples of one file, converted for its task's loss.

    Attributes:
        path: The file.
        task: ``"ir"`` (columns ``anchor, positive_1[, negative_1]``) or ``"sts"`` (``sentence1, sentence2,
            score``).
        dataset: The converted rows.
    """

    path: Path
    task: str
    dataset: Dataset


def load_example_sets(
    paths: Sequence[str | os.PathLike], num_examples: int | None = None, seed: int = 0
) -> list[ExampleSet]:
    """Read example files (IR records or STS pairs, the formats of :mod:`codiemb_st.data`; the task is inferred
    per file) and, with ``num_examples``, draw that many records of each at random.

    IR records become ``anchor, positive_1`` plus ``negative_1`` when every drawn record has hard negatives.

    Raises:
        FileNotFoundError: A file does not exist.
        ValueError: A file is not in the records format (naming ``file:line``), or holds fewer than
            :data:`MIN_EXAMPLES` examples (or fewer than ``num_examples``), or STS pairs whose scores are all equal.
    """
    from codiemb_st.data import dataset_from_records
    from codiemb_st.record_formats import read_ir_records, read_records

    sets = []
    for path in paths:
        path = Path(path)
        located = list(read_records(path))  # file:line errors for lines that are not JSON objects
        if num_examples is not None:
            if len(located) < num_examples:
                raise ValueError(
                    f"examples file {path} holds {len(located)} records, fewer than num_examples={num_examples}."
                )
            located = random.Random(f"{seed}:{path.name}").sample(located, num_examples)
        if len(located) < MIN_EXAMPLES:
            raise ValueError(
                f"examples file {path} holds {len(located)} example(s); CocktailSoup needs at least {MIN_EXAMPLES} per "
                "file to score a candidate (a contrastive loss needs another example as its negative, a correlation "
                "two pairs). Add examples to the file."
            )
        records = [dict(record) for _, record in located]
        task = _task_of(records[0], located[0][0])
        try:
            if task == "ir":
                # Any of the training formats (unified, FlagEmbedding's query/pos/neg, sentence-transformers'
                # anchor/positive/negative), read into one form by the training's own reader.
                ir_records = read_ir_records(records)
                with_negatives = all(record["negatives"] for record in ir_records.records)
                options = {"num_positives": 1, "num_negatives": 1 if with_negatives else 0, "seed": seed}
                dataset = dataset_from_records(ir_records, task="ir", **options)
            else:
                dataset = dataset_from_records(records, task="sts")
        except ValueError as error:  # the readers name "row i" of the drawn records: name the file and line
            match = re.match(r"row (\d+): ", str(error))
            if match is None:
                raise ValueError(f"examples file {path}: {error}") from None
            raise ValueError(f"{located[int(match[1])][0]}: {str(error)[match.end() :]}") from None
        if task == "sts" and len(set(dataset["score"])) < 2:
            raise ValueError(
                f"examples file {path}: every pair has the score {dataset['score'][0]}; the STS loss compares "
                "similarities with the scores' order, so at least two different scores are needed."
            )
        sets.append(ExampleSet(path=path, task=task, dataset=dataset))
    return sets


def _task_of(record: dict[str, Any], location: str) -> str:
    """The task of a file from its first record, by :func:`codiemb_st.data.dataset_from_records`'s rule (its
    ``task_type``, else ``sentence1``/``sentence2`` mean STS, else IR in any of the training formats; unified and
    FlagEmbedding STS records need ``task_type: "sts"``), with a clear error for a record of neither kind."""
    from codiemb_st.record_formats import detect_format

    task = record.get("task_type")
    if task in ("ir", "sts"):
        return task
    if task is not None:
        raise ValueError(f"{location}: `task_type` must be 'ir' or 'sts'; got {task!r}.")
    if "sentence1" in record or "sentence2" in record:
        return "sts"
    if detect_format(record) is not None:
        return "ir"
    raise ValueError(
        f"{location}: not an example record; expected an IR record in a training format (unified: query, positives "
        "[, negatives]; FlagEmbedding: query, pos [, neg]; sentence-transformers: anchor, positive [, negative]) or "
        f"an STS pair (sentence1, sentence2, score), got the keys {sorted(record)}."
    )


def example_loss(model: SentenceTransformer, examples: ExampleSet, batch_size: int = 32) -> float:
    """The loss of ``model`` on one example set, as the task's training loss computes it (one batch: all examples).

    IR examples go through :class:`~codiemb_st.MultiPositiveCachedInfoNCELoss` (temperature 0.02, in-batch and hard
    negatives) with the model's ``query`` prompt on the queries and its ``document`` prompt on the passages; STS pairs
    through :class:`~codiemb_st.PearsonSpearmanLoss` (its default terms) with the ``sts`` prompt on both sentences.
    Prompts the model does not have are left out; prompt tokens its Pooling excludes stay excluded. Runs in eval mode
    without gradients.
    """
    from codiemb_st.losses import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss

    prompts = getattr(model, "prompts", None) or {}
    data = examples.dataset
    if examples.task == "ir":
        loss_module: torch.nn.Module = MultiPositiveCachedInfoNCELoss(
            model, num_positives=1, temperature=0.02, mini_batch_size=batch_size
        )
        columns = [(name, prompts.get("query" if name == "anchor" else "document")) for name in data.column_names]
        labels = None
    else:
        loss_module = PearsonSpearmanLoss(model)
        columns = [(name, prompts.get("sts")) for name in ("sentence1", "sentence2")]
        labels = torch.tensor(data["score"], dtype=torch.float32, device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            features = [
                {
                    key: value.to(model.device) if isinstance(value, Tensor) else value
                    for key, value in model.preprocess(list(data[name]), prompt=prompt or None).items()
                }
                for name, prompt in columns
            ]
            value = loss_module(features, labels)
    finally:
        model.train(was_training)
    return float(value)


#: A transformer block's index in a tensor name: ``encoder.layer.3.``, ``layers.3.``, ``h.3.``, ``blocks.3.``.
_BLOCK_PATTERN = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def layer_group(module_index: int, tensor_name: str) -> str:
    """The layer group of a weight tensor: ``"embeddings"``, ``"block.<i>"`` or ``"head"``.

    In the first module (the Transformer): a name with a block index (``encoder.layer.3.``, ``layers.3.``, ``h.3.``,
    ``blocks.3.``) is ``block.3``; otherwise a name containing ``embed`` (word/position embeddings and their norm) is
    ``embeddings``; everything else (pooler, final norm) and every tensor of the later modules (Dense, ...) is
    ``head``.

    Example:
        ::

            layer_group(0, "encoder.layer.3.attention.self.query.weight")  # "block.3"
    """
    if module_index == 0:
        match = _BLOCK_PATTERN.search(tensor_name)
        if match:
            return f"block.{int(match[1])}"
        if "embed" in tensor_name:
            return "embeddings"
    return "head"


def example_group_losses(model: SentenceTransformer, examples: ExampleSet, batch_size: int = 32) -> dict[str, float]:
    """Per layer group, the loss of ``model`` on one example set: ``head`` is :func:`example_loss`; ``embeddings``
    and ``block.<i>`` are the task loss on the embedding-layer output and on block i's output (hidden state i + 1),
    each pooled by the model's own Pooling module (same mode, prompt tokens excluded as it excludes them) and scored
    with the task loss's ``compute_loss_from_embeddings`` (IR: with duplicate masking; STS: its three terms, no
    middle-layer term). Later modules (Dense, Normalize) apply to ``head`` only.
    """
    from codiemb_st.losses import MultiPositiveCachedInfoNCELoss, PearsonSpearmanLoss
    from codiemb_st.losses.hidden_states import (
        FINAL_LAYER_KEYS,
        hidden_state_modules,
        hidden_states_requested,
    )
    from codiemb_st.losses.text_identity import hash_columns

    transformer, pooling = hidden_state_modules(model)
    prompts = getattr(model, "prompts", None) or {}
    data = examples.dataset
    if examples.task == "ir":
        columns = [(name, prompts.get("query" if name == "anchor" else "document")) for name in data.column_names]
        ir_loss = MultiPositiveCachedInfoNCELoss(model, num_positives=1, temperature=0.02, mini_batch_size=batch_size)
    else:
        columns = [(name, prompts.get("sts")) for name in ("sentence1", "sentence2")]
        sts_loss = PearsonSpearmanLoss(model)
        labels = torch.tensor(data["score"], dtype=torch.float32, device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            layers: list[list[list[Tensor]]] = []  # [column][layer][chunk] pooled embeddings
            identities = []
            for name, prompt in columns:
                texts = list(data[name])
                per_layer: list[list[Tensor]] = []
                for start in range(0, len(texts), batch_size):
                    features = {
                        key: value.to(model.device) if isinstance(value, Tensor) else value
                        for key, value in model.preprocess(
                            texts[start : start + batch_size], prompt=prompt or None
                        ).items()
                    }
                    with hidden_states_requested(transformer):
                        output = model(features)
                    hidden_states = output["all_layer_embeddings"]
                    common = {key: value for key, value in output.items() if key not in FINAL_LAYER_KEYS}
                    for index, hidden in enumerate(hidden_states):
                        pooled = pooling({**common, "token_embeddings": hidden})["sentence_embedding"]
                        if len(per_layer) <= index:
                            per_layer.append([])
                        per_layer[index].append(pooled)
                layers.append(per_layer)
                if examples.task == "ir":
                    identities.append(model.preprocess(texts, prompt=prompt or None))
            text_ids = hash_columns(identities) if examples.task == "ir" else None
            losses: dict[str, float] = {}
            for index in range(len(layers[0])):
                embeddings = [torch.cat(column[index]) for column in layers]
                if examples.task == "ir":
                    value = ir_loss.compute_loss_from_embeddings(embeddings, text_ids)
                else:
                    value = sts_loss.compute_loss_from_embeddings(embeddings, labels)
                losses["embeddings" if index == 0 else f"block.{index - 1}"] = float(value)
    finally:
        model.train(was_training)
    losses["head"] = example_loss(model, examples, batch_size)
    return losses
