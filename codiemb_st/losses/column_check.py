"""Do a dataset's columns fit a multi-positive loss? The check a batch cannot make (it carries no column names).

sentence-transformers 6.3 hands a loss one tokenized dict per column, in dataset order, without the column names:
they are known to the data collator and to ``SentenceTransformerTrainer.compute_loss`` only, and neither passes them
on. So a dataset ``anchor, positive_1, positive_2, negative_1`` given to a loss with ``num_positives=1`` would train
``positive_2`` as a hard negative without a word. :class:`LossColumnCheck`, a trainer callback, reads each training
dataset's columns when training begins and asks its loss (``loss.check_column_names(columns)``, where the loss has
it, also inside wrappers such as ``MatryoshkaLoss``) before the first step.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from transformers import TrainerCallback

#: Columns that are not embedded: the label columns sentence-transformers recognises and the routing column.
NON_TEXT_COLUMNS = frozenset({"dataset_name", "label", "labels", "score", "scores"})
_POSITIVE = re.compile(r"^pos(itive)?(_?\d+)?$", re.IGNORECASE)
_NEGATIVE = re.compile(r"^neg(ative)?(_?\d+)?$", re.IGNORECASE)


def check_ir_columns(column_names: Sequence[str], num_positives: int) -> None:
    """Refuse columns that do not fit ``num_positives`` positive columns after the anchor.

    The rule: columns named like positives (``positive``, ``positive_2``, ``pos_1``) must be exactly the
    ``num_positives`` columns after the anchor, no column named like a negative (``negative_1``, ``neg``) may be
    among those, and there must be at least ``1 + num_positives`` text columns. Other names are not judged.

    Args:
        column_names: A dataset's columns in order (label columns and ``dataset_name`` are skipped).
        num_positives: The loss's P.

    Raises:
        ValueError: Naming the columns, ``num_positives`` and what to pass instead.

    Example:
        ::

            check_ir_columns(["anchor", "positive_1", "positive_2", "negative_1"], num_positives=2)  # fits
    """
    text_columns = [column for column in column_names if column not in NON_TEXT_COLUMNS]
    slots = text_columns[1 : 1 + num_positives]
    positives = [column for column in text_columns[1:] if _POSITIVE.match(column)]
    negatives_in_slots = [column for column in slots if _NEGATIVE.match(column)]
    if len(text_columns) >= 1 + num_positives and not negatives_in_slots and (not positives or positives == slots):
        return
    if negatives_in_slots:
        problem = f"{', '.join(negatives_in_slots)} would be trained as positive(s)"
        fix = (
            "put the positive columns right after the anchor"
            if len(positives) == num_positives
            else f"pass num_positives={len(positives) or 1}"
        )
    elif positives and positives != slots:
        extra = [column for column in positives if column not in slots]
        problem = (
            f"{', '.join(extra)} would be trained as hard negative(s)"
            if extra
            else f"the positive columns {positives} are not the {num_positives} column(s) right after the anchor"
        )
        fix = f"pass num_positives={len(positives)}"
    else:
        problem = f"it needs at least {1 + num_positives} text columns (anchor and {num_positives} positive(s))"
        fix = "pass the number of positive columns as num_positives"
    raise ValueError(
        f"num_positives={num_positives} does not fit the dataset columns {list(column_names)}: {problem}. "
        f"To fix: {fix} (with the recipe: load_task_datasets(num_positives=...)), or keep only the columns you "
        "mean with dataset.select_columns([...])."
    )


class LossColumnCheck(TrainerCallback):
    """A trainer callback: before the first step, every training dataset's columns are checked by its loss.

    A loss (or a loss it wraps, found through a ``loss`` attribute) that has ``check_column_names(columns)`` is asked
    about the columns of each dataset it trains on; any error stops training before a step is taken.

    Args:
        loss: The trainer's ``loss``: one loss, or ``{dataset name: loss}``.

    Example:
        ::

            loss = MultiPositiveCachedInfoNCELoss(model, num_positives=2)
            trainer = SentenceTransformerTrainer(
                model=model, train_dataset=dataset, loss=loss, callbacks=[LossColumnCheck(loss)]
            )
            trainer.train()  # ValueError at once if dataset's columns have another number of positives
    """

    def __init__(self, loss: Any | Mapping[str, Any]) -> None:
        self.loss = loss

    def on_train_begin(self, args: Any, state: Any, control: Any, train_dataloader: Any = None, **kwargs: Any) -> None:
        for name, columns in _dataset_columns(getattr(train_dataloader, "dataset", None)):
            if isinstance(self.loss, Mapping):
                if name not in self.loss:
                    continue
                loss = self.loss[name]
            else:
                loss = self.loss
            for module in _wrapped_losses(loss):
                check = getattr(module, "check_column_names", None)
                if callable(check):
                    try:
                        check(columns)
                    except ValueError as error:
                        where = f"training dataset {name!r}" if name else "the training dataset"
                        raise ValueError(f"{type(module).__name__} on {where}: {error}") from None


def _wrapped_losses(loss: Any) -> Iterator[Any]:
    seen: set[int] = set()
    while loss is not None and id(loss) not in seen:
        seen.add(id(loss))
        yield loss
        loss = getattr(loss, "loss", None)


def _dataset_columns(dataset: Any) -> Iterator[tuple[str | None, list[str]]]:
    """``(name, columns)`` of each dataset under the trainer's dataloader (a ``ConcatDataset`` for a DatasetDict)."""
    if dataset is None:
        return
    for part in getattr(dataset, "datasets", None) or [dataset]:
        columns = getattr(part, "column_names", None)
        if not columns:
            continue
        name = None
        if len(part):  # the trainer adds `dataset_name` as a transform: the first row tells it
            first = part[0]
            if isinstance(first, Mapping):
                name = first.get("dataset_name")
        yield name, [column for column in columns if column != "dataset_name"]


__all__ = ["NON_TEXT_COLUMNS", "LossColumnCheck", "check_ir_columns"]
