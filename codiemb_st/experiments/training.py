"""Resumable training runs on top of :mod:`codiemb_st.recipe`: the tail every study's run shares.

A run folder is finished when it holds ``train_log.json`` (the done marker, written last) and a ``run_config.json``
equal to the run's configuration: such a run is reused, so an interrupted study resumes and a changed setting
retrains only the runs it touches.

Example:
    >>> log = finished_run(Path("runs/fusion/models/codiemb_s1"), config)  # doctest: +SKIP
    >>> if log is None:  # doctest: +SKIP
    ...     model = load_base(base, max_seq_length=64, freeze_embeddings=True)
    ...     log = train_to_folder(model, datasets, losses, training_args, output, config)
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from codiemb_st.file_io import write_json_atomic

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainingArguments
    from torch import nn

    from codiemb_st.recipe import TaskDatasets


def finished_run(output: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The training log of the finished run in ``output`` when it was made with ``config``; else ``None``, with
    whatever was in ``output`` removed."""
    log_path, config_path = output / "train_log.json", output / "run_config.json"
    if log_path.is_file() and config_path.is_file() and json.loads(config_path.read_text("utf-8")) == config:
        return json.loads(log_path.read_text("utf-8"))
    if output.exists():
        shutil.rmtree(output)
    return None


def load_base(
    base: str, max_seq_length: int, freeze_embeddings: bool, device: str | None = None
) -> SentenceTransformer:
    """The base SentenceTransformer on ``device`` (default: CUDA when available), with its training length set and,
    with ``freeze_embeddings``, its word-embedding matrix frozen (the deltas then live in the transformer blocks)."""
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(base, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.max_seq_length = max_seq_length
    if freeze_embeddings:
        model[0].auto_model.get_input_embeddings().weight.requires_grad_(False)
    return model


def count_task_updates(datasets: TaskDatasets, losses: dict[str, nn.Module]) -> dict[str, int]:
    """``{"ir": n, "sts": m}``, counting the forward passes each task's loss takes from now on (the evidence that a
    budget gave each task the updates it claims)."""
    updates = {"ir": 0, "sts": 0}
    task_of = {id(losses[name]): "ir" if name in datasets.ir else "sts" for name in losses}
    for loss in {id(loss): loss for loss in losses.values()}.values():
        loss.register_forward_pre_hook(
            lambda module, _inputs: updates.__setitem__(task_of[id(module)], updates[task_of[id(module)]] + 1)
        )
    return updates


def train_to_folder(
    model: SentenceTransformer,
    datasets: TaskDatasets,
    losses: dict[str, nn.Module],
    training_args: SentenceTransformerTrainingArguments,
    output: Path,
    config: dict[str, Any],
    *,
    extra_log: dict[str, Any] | None = None,
    keep_steps: Sequence[int] = (),
) -> dict[str, Any]:
    """Train ``model`` with sentence-transformers' trainer and save the finished run into ``output``.

    Writes the model, then ``run_config.json`` (``config``) and last ``train_log.json`` (seconds, steps, the
    entries of ``extra_log``, the loss curve); removes the trainer's scratch folder ``output/trainer``.

    Args:
        keep_steps: Intermediate checkpoints to keep (the trainer must save at these steps): checkpoint ``i`` (from
            1) is copied to ``<output>@<i>`` with a ``train_log.json`` naming its step.

    Returns:
        The training log.
    """
    from sentence_transformers import SentenceTransformerTrainer

    trainer = SentenceTransformerTrainer(
        model=model, args=training_args, train_dataset=datasets.dataset_dict(), loss=losses
    )
    tick = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - tick
    model.save(str(output))
    for index, step in enumerate(keep_steps, start=1):
        target = output.parent / f"{output.name}@{index}"
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(
            output / "trainer" / f"checkpoint-{step}",
            target,
            ignore=shutil.ignore_patterns("trainer_state.json", "*.pt", "*.pth"),
        )
        write_json_atomic(target / "train_log.json", {"step": step, "of": output.name})
    log = {"seconds": seconds, "steps": trainer.state.global_step, **(extra_log or {})}
    log["loss"] = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    write_json_atomic(output / "run_config.json", config)
    write_json_atomic(output / "train_log.json", log)  # the done marker, written last
    shutil.rmtree(output / "trainer", ignore_errors=True)
    del trainer
    gc.collect()
    return log


__all__ = ["count_task_updates", "finished_run", "load_base", "train_to_folder"]
