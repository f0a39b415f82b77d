"""The merge-method base class :class:`MergeMethod`: the registry, the driver every method runs through, and the
public ``merge`` / ``merge_to_folder`` / ``merge_tensors`` API.

A method family is one module (:mod:`~codiemb_st.merging.soup`, :mod:`~codiemb_st.merging.delta_soup`, ...) holding
its class and its math; the class registers itself under its command-line name where it is defined::

    class MyMethod(MergeMethod, name="my_method"):
        def merge_rows(self, checkpoints, base, statistics=None):
            ...

The driver is declared once, here: the per-tensor hook (:meth:`MergeMethod.for_tensor`), the statistics pass
(:meth:`MergeMethod.collect_statistics`, over :meth:`MergeMethod.accumulate_statistics` and
:meth:`MergeMethod.finish_statistics_pass`) and the merge pass (:meth:`MergeMethod.merge_rows`), run on whole tensors
by :meth:`MergeMethod.merge_tensors` and on streamed row slices by :meth:`MergeMethod.merge_streamed`, which the
streaming I/O (:mod:`~codiemb_st.merging.streaming_merge`, which knows no method) calls for every tensor.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from codiemb_st._compat import SentenceTransformer
from codiemb_st.merging.adapters import check_adapter_bases, warn_on_adapter_base_mismatch
from codiemb_st.merging.model_card import CARD_NAME, card_base_model, merged_model_card, recorded_base_model
from codiemb_st.merging.model_folder import ModelFolder, check_compatible
from codiemb_st.merging.streaming_merge import (
    ModelInput,
    StreamedTensor,
    as_folders,
    check_checkpoints_argument,
    check_output_path,
    checkpoint_inputs,
    copy_non_weight_files,
    distinct_checkpoints,
    input_record,
    make_parents,
    remove_created,
    remove_stale_work_folders,
    stream_weight_file,
    work_folder_prefix,
)
from codiemb_st.merging.tensor_math import all_equal, check_tensors, compute_dtype
from codiemb_st.validation import check_finite_float

logger = logging.getLogger(__name__)

#: The merge methods by their command-line name (``codiemb-st merge --method NAME``), filled as each method class
#: is defined (``class ModelSoup(MergeMethod, name="model_soup")``).
MERGE_METHODS: dict[str, type[MergeMethod]] = {}

_METHOD_NAME = re.compile(r"[a-z][a-z0-9_]*")


class MergeMethod(ABC):
    """Base class of the merge methods: the per-tensor math plus the driver that runs it on tensors and folders.

    A subclass implements :meth:`merge_rows` and gives its command-line name as a class keyword, which registers it
    in :data:`MERGE_METHODS` (a class without a name, e.g. a helper, is not registered). Its constructor parameters
    are its options, in Python and on the command line (``--name VALUE``; ``bool``, ``int``, ``float``, ``str``,
    ``Literal[...]`` and sequences of these). Methods whose weights depend on a whole tensor also return True from
    :attr:`needs_tensor_statistics` and implement :meth:`accumulate_statistics` (and, for several passes,
    :meth:`finish_statistics_pass`). Methods that merge tensors differently override the per-tensor hook
    :meth:`for_tensor`.

    Example:
        ::

            class Average(MergeMethod, name="average"):
                requires_base = False

                def merge_rows(self, checkpoints, base, statistics=None):
                    return checkpoints.mean(dim=0)

            Average().merge_to_folder(["runs/a", "runs/b"], "merged")  # or: codiemb-st merge --method average
    """

    #: The command-line name the class was registered under (None for an unregistered class).
    name: ClassVar[str | None] = None
    #: Whether the method needs the base (pre-trained) model θ_0.
    requires_base: ClassVar[bool] = True
    #: Whether merging identical checkpoints returns them (then identical inputs are copied bit for bit).
    keeps_agreement: bool = True
    #: The fewest checkpoints the method can merge.
    min_checkpoints: ClassVar[int] = 1
    #: Whether one LoRA adapter checkpoint may be "merged" alone: its materialisation as a full model (ModelSoup).
    materialises_one_adapter: ClassVar[bool] = False

    def __init_subclass__(cls, *, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cls.name = name  # a subclass of a registered method is another method: it is not registered by its parent
        if name is None:
            return
        if not isinstance(name, str) or not _METHOD_NAME.fullmatch(name):
            raise ValueError(f"A merge method's name must be lowercase letters, digits and _, got {name!r}.")
        registered = MERGE_METHODS.get(name)
        # The same class defined again (a re-run notebook cell, a reloaded module) replaces itself.
        if registered is not None and (registered.__module__, registered.__qualname__) != (
            cls.__module__,
            cls.__qualname__,
        ):
            raise ValueError(
                f"The merge method name {name!r} is taken by {registered.__module__}.{registered.__name__}."
            )
        MERGE_METHODS[name] = cls

    # -----------------------------------------------------------------------------------------------------------------
    # What a method implements

    @abstractmethod
    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        """Merge one slice of rows (the merge pass).

        Args:
            checkpoints: The slice of every checkpoint stacked along a new dim 0, shape ``(K, rows, ...)``, in the
                compute dtype (float32, or float64 for float64 inputs). A scratch buffer: the method may overwrite it
                (the subtraction of the base is done in place, which saves memory and time).
            base: The same slice of the base tensor, shape ``(rows, ...)``, or None when the method needs no base.
            statistics: The per-tensor statistics from :meth:`collect_statistics`, when the method uses them; None
                when the rows are the whole tensor and :meth:`merge_rows` is called directly.

        Returns:
            The merged slice, shape ``(rows, ...)``, in the compute dtype.
        """

    @property
    def needs_tensor_statistics(self) -> bool:
        """Whether the weights of a row depend on the whole tensor (then tensors are read twice when streamed)."""
        return False

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> Any:
        """Fold one slice of rows into the per-tensor statistics (only when :attr:`needs_tensor_statistics`).

        Args:
            statistics: The statistics of the slices seen so far, or None for the first slice.
            checkpoints: The slice of every checkpoint, stacked: shape ``(K, rows, ...)``. Must not be modified.
            base: The same slice of the base tensor, shape ``(rows, ...)``, or None.

        Returns:
            The updated statistics.
        """
        raise NotImplementedError(f"{type(self).__name__} does not use per-tensor statistics.")

    def finish_statistics_pass(self, statistics: Any) -> tuple[Any, bool]:
        """Close one pass over all slices of a tensor: returns the statistics and whether another pass is needed.

        The default is one pass. Methods that need several (TIES's exact top-k threshold) override it.
        """
        return statistics, False

    def for_tensor(self, module_index: int, tensor_name: str) -> MergeMethod:
        """The per-tensor hook: the method that merges this tensor. By default this method itself; CocktailSoup
        with ``layer_groups`` returns the weighted average with the tensor's layer-group weights.

        Args:
            module_index: The index of the module (``modules.json``) the tensor belongs to.
            tensor_name: The tensor's name in that module's weight file.
        """
        return self

    def one_checkpoint_copies(self) -> str | None:
        """What merging a single checkpoint (with the base) returns unchanged: ``"checkpoint"``, ``"base"``, or None
        when the result is a new model.

        One checkpoint is refused where the output would be a copy of an input (see
        :func:`check_checkpoint_count`). The default, a copy of the checkpoint, holds for every weighted average
        (ModelSoup, DeltaSoup, CocktailSoup: its one weight is 1); TaskArithmetic and TIES override it, since
        θ_0 + λ · δ is new for λ ∉ {0, 1}.
        """
        return "checkpoint"

    def one_checkpoint_needs(self) -> str | None:
        """What makes one checkpoint a new model with this method (for the refusal's advice), or None."""
        return None

    def checkpoint_weights(self, num_checkpoints: int) -> list[float] | None:
        """The weight of each checkpoint in the merge, for the model card: None (the default) when the method weighs
        them per tensor or per parameter."""
        return None

    def get_config_dict(self) -> dict[str, Any]:
        """The method's parameters (written to ``merge_config.json`` and the model card next to a merged model)."""
        return {}

    def __repr__(self) -> str:
        parameters = ", ".join(f"{key}={value!r}" for key, value in self.get_config_dict().items())
        return f"{type(self).__name__}({parameters})"

    # -----------------------------------------------------------------------------------------------------------------
    # The driver: the same passes on whole tensors and on streamed row slices

    def collect_statistics(self, slices: Callable[[], Iterable[tuple[Tensor, Tensor | None]]]) -> Any:
        """The statistics pass(es): fold every ``(checkpoints, base)`` slice of ``slices()`` into the statistics,
        once per pass, until :meth:`finish_statistics_pass` says they are complete.

        ``slices`` is called once per pass (a streamed tensor is read again each time). Returns None when the method
        needs no statistics.
        """
        if not self.needs_tensor_statistics:
            return None
        statistics = None
        while True:
            for checkpoints, base in slices():
                statistics = self.accumulate_statistics(statistics, checkpoints, base)
            statistics, again = self.finish_statistics_pass(statistics)
            if not again:
                return statistics

    def statistics_of(self, checkpoints: Tensor, base: Tensor | None) -> Any:
        """The per-tensor statistics of rows that are a whole tensor (for :meth:`merge_rows` called directly)."""
        return self.collect_statistics(lambda: [(checkpoints, base)])

    def merge_streamed(self, tensor: StreamedTensor) -> Iterator[Tensor]:
        """Merge one tensor read in row slices: the per-tensor hook, the statistics pass(es), then the merge pass.

        A slice on which every input that matters agrees is copied bit for bit: the checkpoints, for a method that
        :attr:`keeps_agreement`; the checkpoints and the base otherwise (nothing moved).

        Args:
            tensor: The tensor of every input (:class:`~codiemb_st.merging.streaming_merge.StreamedTensor`).

        Returns:
            The merged row slices in order, in the compute dtype (or as stored, for a copied slice).
        """
        merger = self.for_tensor(tensor.module_index, tensor.name)
        statistics = merger.collect_statistics(tensor.stacked_slices)
        k = tensor.num_checkpoints
        for rows in tensor.slices():
            agreed = merger.keeps_agreement or (len(rows.stored) > k and all_equal(rows.stored))
            if agreed and all_equal(rows.stored[:k]):
                yield rows.stored[0]
            else:
                yield merger.merge_rows(rows.checkpoints, rows.base, statistics)

    def merge_tensors(self, tensors: Sequence[Tensor], base: Tensor | None = None) -> Tensor:
        """Merge one tensor of K checkpoints: the pure per-tensor function.

        The math runs in float32 (float64 for float64 inputs) and the result is cast back to the dtype of
        ``tensors[0]``. When :attr:`keeps_agreement` and all K tensors are equal, ``tensors[0]`` is returned
        unchanged (a copy), bit for bit.

        Args:
            tensors: The K >= 1 checkpoint tensors, all of the same shape.
            base: The base tensor θ_0 of the same shape; required when :attr:`requires_base`.

        Returns:
            The merged tensor, with the shape and dtype of ``tensors[0]``.

        Raises:
            TypeError: If a tensor is not a floating-point tensor.
            ValueError: If there are no tensors, shapes differ, the base is missing although required, or an input
                holds NaN or infinite values.
        """
        tensors = check_tensors(tensors, base, self.requires_base, type(self).__name__)
        if len(tensors) < self.min_checkpoints:
            raise ValueError(
                f"{type(self).__name__} needs at least {self.min_checkpoints} checkpoints, got {len(tensors)}."
            )
        shape = tensors[0].shape
        if self.keeps_agreement and all_equal(tensors):
            return tensors[0].clone()
        dtype = compute_dtype(tensors[0].dtype)
        # Row slices need a leading dim: a 0-d tensor is merged as one row of one element.
        stacked = torch.stack([tensor.to(dtype).reshape(shape or (1,)) for tensor in tensors])
        base_rows = None if base is None or not self.requires_base else base.to(dtype).reshape(shape or (1,))
        statistics = self.statistics_of(stacked, base_rows)
        return self.merge_rows(stacked, base_rows, statistics).reshape(shape).to(tensors[0].dtype)

    # -----------------------------------------------------------------------------------------------------------------
    # Model folders

    def merge(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        *,
        base_model: str | Path | SentenceTransformer | None = None,
        output_path: str | Path | None = None,
        show_progress_bar: bool = True,
    ) -> SentenceTransformer:
        """Merge sentence-transformers checkpoints and return the merged model.

        Streams the weights tensor by tensor (peak memory about one model, whatever the number of checkpoints),
        writes the merged folder to a temporary folder next to ``output_path`` and renames it into place, then loads
        it. The non-weight files (modules.json, Pooling/Dense/Normalize configs, prompts, tokenizer) come from
        ``checkpoints[0]``, with a warning for every setting another checkpoint has otherwise; see
        :mod:`codiemb_st.merging.streaming_merge` for the rules. A model card (README.md) and ``merge_config.json``
        record the method, its parameters and the inputs.

        Args:
            checkpoints: The K >= 2 distinct fine-tuned models: sentence-transformers model folders (safetensors
                weights) or ``SentenceTransformer`` objects (saved to a temporary folder first). One checkpoint, or
                the same folder twice, is refused where the output would be a copy of an input (ModelSoup of one
                LoRA adapter materialises it, with a warning; one checkpoint with TaskArithmetic or TIES is
                θ_0 + λ · δ, allowed where that is not a copy: see :meth:`one_checkpoint_copies`).
            base_model: The pre-trained model the checkpoints were fine-tuned from (folder or object). Required by
                DeltaSoup and TaskArithmetic; ModelSoup only checks it is compatible.
            output_path: Where to write the merged model folder. It must not exist yet (or be an empty folder) and
                must not be, lie inside, or hold an input (a ValueError naming both, before anything is read). With
                None, the folder is written to a temporary directory that is removed after loading.
            show_progress_bar: Show a progress bar per weight file.

        Returns:
            The merged ``SentenceTransformer``.

        Example:
            ::

                merged = DeltaSoup().merge(["runs/a", "runs/b"], base_model="models/base", output_path="merged")
        """
        if output_path is not None:
            path = self.merge_to_folder(
                checkpoints, output_path, base_model=base_model, show_progress_bar=show_progress_bar
            )
            return SentenceTransformer(str(path))
        with tempfile.TemporaryDirectory(prefix="codiemb_merged_") as tmp:
            path = self.merge_to_folder(
                checkpoints, Path(tmp) / "merged", base_model=base_model, show_progress_bar=show_progress_bar
            )
            return SentenceTransformer(str(path))

    def merge_to_folder(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        output_path: str | Path,
        *,
        base_model: str | Path | SentenceTransformer | None = None,
        show_progress_bar: bool = True,
    ) -> Path:
        """Like :meth:`merge`, but only write the merged folder (the model is not loaded) and return its path.

        Example:
            ::

                path = ModelSoup().merge_to_folder(["runs/a", "runs/b"], "merged")
        """
        return merge_model_folders(
            self, checkpoints, output_path, base_model=base_model, show_progress_bar=show_progress_bar
        )


def merge_model_folders(
    method: MergeMethod,
    checkpoints: Sequence[ModelInput],
    output_path: str | Path,
    *,
    base_model: ModelInput | None = None,
    show_progress_bar: bool = True,
    copy_single: bool = False,
) -> Path:
    """Merge the checkpoints with ``method`` into a new model folder at ``output_path`` and return its path.

    Args:
        method: The merge method.
        checkpoints: The model folders or SentenceTransformer objects to merge: at least two distinct ones, or one
            where the result is not a copy (see :func:`check_checkpoint_count`).
        output_path: The folder to create; it must not exist (an empty folder is replaced) and must not be, lie
            inside, or hold an input folder (see :func:`~codiemb_st.merging.streaming_merge.check_output_path`).
        base_model: The pre-trained model (folder or object); required when ``method.requires_base``.
        show_progress_bar: Show a progress bar per weight file.
        copy_single: Write one checkpoint as it is (GreedySoup's first soup) instead of refusing it.

    Example:
        ::

            merge_model_folders(ModelSoup(), ["runs/a", "runs/b"], "merged")
    """
    base = base_model
    checkpoints = check_checkpoints_argument(checkpoints)
    if base is None and method.requires_base:
        raise ValueError(
            f"{type(method).__name__} needs base_model=: the pre-trained model the checkpoints were fine-tuned from "
            "(a model folder or a SentenceTransformer)."
        )
    if base is not None and not isinstance(base, (str, Path, SentenceTransformer)):
        raise TypeError(f"base_model must be a model folder path or a SentenceTransformer, got {type(base).__name__}.")
    if not isinstance(output_path, (str, Path)):
        raise TypeError(f"output_path must be a path, got {type(output_path).__name__}.")
    output_path = Path(output_path).absolute()
    check_output_path(output_path, checkpoint_inputs(checkpoints, base))

    with as_folders(checkpoints, base) as (checkpoint_paths, base_path):
        folders = [ModelFolder.open(path, f"checkpoints[{i}]") for i, path in enumerate(checkpoint_paths)]
        base_folder = ModelFolder.open(base_path, "base") if base_path is not None else None
        _attach_adapter_base(method, folders, base_folder)
        for folder in folders[1:]:
            check_compatible(folders[0], folder, is_checkpoint=True)
        if base_folder is not None:
            check_compatible(folders[0], base_folder, is_checkpoint=False)
        if not copy_single:
            check_checkpoint_count(method, checkpoints, single_adapter=len(folders) == 1 and bool(folders[0].adapters))
        inputs = folders + ([base_folder] if base_folder is not None and method.requires_base else [])

        created_parents = make_parents(output_path.parent)
        try:
            remove_stale_work_folders(output_path, ".partial")
            tmp = Path(
                tempfile.mkdtemp(prefix=work_folder_prefix(output_path), suffix=".partial", dir=output_path.parent)
            )
        except BaseException:
            remove_created(created_parents)
            raise
        try:
            config = _merge_record(method, checkpoints, folders, base, base_folder)
            copy_non_weight_files(folders[0], tmp)
            for source, relative in folders[0].base_config_files():  # an adapter module has no config.json
                shutil.copy2(source, tmp / relative)
            for key in folders[0].weight_files:
                target = tmp / (folders[0].module_folder(key[0]) / key[1]).relative_to(folders[0].path)
                target.parent.mkdir(parents=True, exist_ok=True)
                stream_weight_file(inputs, key, target, method.merge_streamed, len(folders), show_progress_bar)
            (tmp / "merge_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf8")
            _write_model_card(method, checkpoints, folders, base, config, tmp)
            if output_path.is_dir() and not any(output_path.iterdir()):
                output_path.rmdir()  # an empty folder the caller prepared
            os.rename(tmp, output_path)  # atomic; fails rather than overwriting anything
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            remove_created(created_parents)  # a failed merge leaves nothing behind, not even empty parents
            raise
    logger.info(f"Merged {len(folders)} checkpoints with {method!r} into {output_path}")
    return output_path


def _merge_record(
    method: MergeMethod,
    checkpoints: list[ModelInput],
    folders: list[ModelFolder],
    base: ModelInput | None,
    base_folder: ModelFolder | None,
) -> dict[str, Any]:
    """What ``merge_config.json`` records: the method, its parameters, and every input with a hash of its weights."""
    adapters = [folder.role for folder in folders if folder.adapters]
    config: dict[str, Any] = {
        "method": type(method).__name__,
        "parameters": method.get_config_dict(),
        "num_checkpoints": len(folders),
        "checkpoints": [input_record(given, folder) for given, folder in zip(checkpoints, folders)],
        "base_model": None,
        # The merged folder's non-weight files (modules, Pooling, prompts, tokenizer, config.json) are its copies.
        "settings_from": "checkpoints[0]",
    }
    if base_folder is not None:
        # ModelSoup only checks a base it is given; adapters are read as base + delta whatever the method.
        config["base_model"] = {**input_record(base, base_folder), "used": bool(method.requires_base or adapters)}
    if adapters:
        config["lora_checkpoints"] = adapters  # materialised as base + scaling * B A
    return config


def _write_model_card(
    method: MergeMethod,
    checkpoints: list[ModelInput],
    folders: list[ModelFolder],
    base: ModelInput | None,
    record: dict[str, Any],
    folder: Path,
) -> None:
    """Write the merged folder's README.md (:mod:`~codiemb_st.merging.model_card`) from the merge's record."""
    if isinstance(base, SentenceTransformer):
        base_name, base_label = base.model_card_data.base_model, "a SentenceTransformer object"
    else:
        base_name = base_label = None if base is None else str(base)
    card = merged_model_card(
        folder,
        record,
        method_name=method.name or type(method).__name__,
        inputs=[
            "a SentenceTransformer object" if isinstance(given, SentenceTransformer) else str(given)
            for given in checkpoints
        ],
        weights=method.checkpoint_weights(len(checkpoints)),
        base_model=card_base_model(base_name, [recorded_base_model(f.path) for f in folders]),
        base_label=base_label,
    )
    card.save(folder / CARD_NAME)


def _attach_adapter_base(method: MergeMethod, folders: list[ModelFolder], base_folder: ModelFolder | None) -> None:
    """Let LoRA adapter checkpoints read as base + δ: they need the base model, whatever the method."""
    adapters = [folder for folder in folders if folder.adapters]
    if not adapters:
        return
    if base_folder is None:
        raise ValueError(
            f"{adapters[0].role} is a LoRA adapter checkpoint, so base_model= is required (also for "
            f"{type(method).__name__}): its weights are the base model's plus scaling * B A. Pass the pre-trained "
            "model the adapters were trained on."
        )
    modules = [(folder.role, index, adapter) for folder in adapters for index, adapter in folder.adapters.items()]
    check_adapter_bases(modules)
    for folder in adapters:
        folder.attach_base(base_folder)
    recorded = {
        index: (
            base_folder.read_json(Path(base_folder.modules[index].get("path", "")) / "config.json", dict) or {}
        ).get("_name_or_path")
        for _, index, _ in modules
    }
    warn_on_adapter_base_mismatch(modules, base_folder.path, recorded)


def check_checkpoint_count(method: Any, checkpoints: Sequence[ModelInput], *, single_adapter: bool = False) -> None:
    """The one rule of every method that combines checkpoints: no output that is a copy of an input.

    At least two distinct checkpoints (or the method's ``min_checkpoints``) are needed, with two exceptions where one
    checkpoint means something: a method whose single-checkpoint result is a new model
    (:meth:`MergeMethod.one_checkpoint_copies` is None: TaskArithmetic's θ_0 + λ · δ at λ ∉ {0, 1}, TIES's trimmed
    task vector), and a method that :attr:`~MergeMethod.materialises_one_adapter` (ModelSoup) given one LoRA adapter
    checkpoint (``single_adapter``), which it writes as a full model, with a warning saying so. One checkpoint
    otherwise, or the same one given twice, would come out as a copy of itself (or of the base) while the call looks
    like a merge: refused.

    Args:
        method: A :class:`MergeMethod`, or any combiner of checkpoints (GreedySoup): its ``min_checkpoints``,
            ``one_checkpoint_copies`` and ``materialises_one_adapter`` are read where it has them.
        checkpoints: The checkpoints as given.
        single_adapter: Whether the one checkpoint is a LoRA adapter.

    Raises:
        ValueError: Naming the method, the number of checkpoints given and of distinct ones, and what to do.
    """
    name = type(method).__name__
    minimum = getattr(method, "min_checkpoints", 2)
    needed = max(2, minimum)
    distinct = distinct_checkpoints(checkpoints)
    if distinct >= needed:
        return
    copies = method.one_checkpoint_copies() if hasattr(method, "one_checkpoint_copies") else "checkpoint"
    if len(checkpoints) == 1 and minimum <= 1 and copies is None:
        logger.info(f"{method!r} of one checkpoint: the base plus its scaled (or trimmed) task vector.")
        return
    materialises = getattr(method, "materialises_one_adapter", False)
    if single_adapter and materialises and len(checkpoints) == 1:
        logger.warning(
            f"{name} of one LoRA adapter checkpoint: the output is that adapter materialised on base_model "
            "(base + scaling * B A) as a full model, not a merge of several checkpoints."
        )
        return
    given = f"{len(checkpoints)} checkpoint(s)" + (f", {distinct} distinct" if distinct != len(checkpoints) else "")
    copy_of = "the base" if copies == "base" and len(checkpoints) == 1 else "the input"
    advice = "Pass two or more different checkpoints"
    needs = method.one_checkpoint_needs() if hasattr(method, "one_checkpoint_needs") else None
    if needs and len(checkpoints) == 1:
        advice += f" (one checkpoint with {method!r} is a copy: {name} of one checkpoint needs {needs})"
    raise ValueError(
        f"{name} combines checkpoints and needs at least {needed} distinct ones; got {given} (the same folder "
        f"twice counts once). The output would be a copy of {copy_of}, not a merge. {advice}"
        + (
            "; to materialise one LoRA adapter as a full model, use ModelSoup with that adapter."
            if not materialises
            else "."
        )
    )


def check_weights(name: str, weights: Any) -> list[float]:
    """Per-checkpoint weights as a list of floats: finite, non-negative, at least one positive.

    Raises:
        TypeError: ``weights`` is not a sequence of numbers.
        ValueError: A weight is negative or not finite, or all are 0.

    Example:
        ::

            check_weights("weights", [3, 1])  # [3.0, 1.0]
    """
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers (one per checkpoint), got {type(weights).__name__}.")
    values = [float(check_finite_float(f"{name}[{i}]", w, minimum=0.0)) for i, w in enumerate(weights)]
    if not values or sum(values) <= 0:
        raise ValueError(f"{name} must hold at least one positive weight, got {values}.")
    return values


__all__ = ["MERGE_METHODS", "MergeMethod", "check_checkpoint_count", "check_weights", "merge_model_folders"]
