"""The merge-method base class :class:`MergeMethod` (parameters, the public ``merge`` / ``merge_to_folder`` /
``merge_tensors`` API over :mod:`~codiemb_st.merging.streaming_merge`) and the weight check the methods share.

The method families build on it: :mod:`~codiemb_st.merging.methods` (DeltaSoup, ModelSoup, TaskArithmetic,
ModelStock, TIES), :mod:`~codiemb_st.merging.spherical` (SLERP, MultiSLERP), :mod:`~codiemb_st.merging.cocktail`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from codiemb_st.merging.streaming_merge import merge_and_load, merge_model_folders
from codiemb_st.merging.tensor_math import (
    fold_statistics,
    merge_whole_tensor,
)
from codiemb_st.validation import check_finite_float

if TYPE_CHECKING:
    from codiemb_st._compat import SentenceTransformer


class MergeMethod(ABC):
    """Base class of the merge methods: the per-tensor math plus :meth:`merge`, which streams model folders.

    Subclasses implement :meth:`merge_rows`; methods whose weights depend on a whole tensor also set
    :attr:`needs_tensor_statistics` and implement :meth:`accumulate_statistics`.
    """

    #: Whether the method needs the base (pre-trained) model θ_0.
    requires_base: ClassVar[bool] = True
    #: Whether merging identical checkpoints returns them (then identical inputs are copied bit for bit).
    keeps_agreement: bool = True
    #: The fewest checkpoints the method can merge.
    min_checkpoints: ClassVar[int] = 1

    def one_checkpoint_copies(self) -> str | None:
        """What merging a single checkpoint (with the base) returns unchanged: ``"checkpoint"``, ``"base"``, or None
        when the result is a new model.

        One checkpoint is refused where the output would be a copy of an input (see
        :func:`~codiemb_st.merging.streaming_merge.check_checkpoint_count`). The default, a copy of the checkpoint,
        holds for every weighted average (ModelSoup, DeltaSoup, CocktailSoup: its one weight is 1); TaskArithmetic
        and TIES override it, since θ_0 + λ · δ is new for λ ∉ {0, 1}.
        """
        return "checkpoint"

    @property
    def needs_tensor_statistics(self) -> bool:
        """Whether the weights of a row depend on the whole tensor (then tensors are read twice when streamed)."""
        return False

    def finish_statistics_pass(self, statistics: Any) -> tuple[Any, bool]:
        """Close one pass over all slices of a tensor: returns the statistics and whether another pass is needed.

        The default is one pass. Methods that need several (TIES's exact top-k threshold) override it.
        """
        return statistics, False

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> Any:
        """Fold one slice of rows into the per-tensor statistics (only when :attr:`needs_tensor_statistics`).

        Args:
            statistics: The statistics of the slices seen so far, or None for the first slice.
            checkpoints: The slice of every checkpoint, stacked: shape ``(K, rows, ...)``.
            base: The same slice of the base tensor, shape ``(rows, ...)``, or None.

        Returns:
            The updated statistics.
        """
        raise NotImplementedError(f"{type(self).__name__} does not use per-tensor statistics.")

    @abstractmethod
    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        """Merge one slice of rows.

        Args:
            checkpoints: The slice of every checkpoint stacked along a new dim 0, shape ``(K, rows, ...)``, in the
                compute dtype (float32, or float64 for float64 inputs). A scratch buffer: the method may overwrite it
                (the subtraction of the base is done in place, which saves memory and time).
            base: The same slice of the base tensor, shape ``(rows, ...)``, or None when the method needs no base.
            statistics: The per-tensor statistics from :meth:`accumulate_statistics`, when the method uses them.

        Returns:
            The merged slice, shape ``(rows, ...)``, in the compute dtype.
        """

    def _statistics_of(self, checkpoints: Tensor, base: Tensor | None) -> Any:
        """The per-tensor statistics of rows that are a whole tensor (``merge_rows`` called without statistics)."""
        return fold_statistics(self, lambda: [(checkpoints, base)])

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
        return merge_whole_tensor(self, tensors, base)

    def get_config_dict(self) -> dict[str, Any]:
        """The method's parameters (written to ``merge_config.json`` next to a merged model)."""
        return {}

    def __repr__(self) -> str:
        parameters = ", ".join(f"{key}={value!r}" for key, value in self.get_config_dict().items())
        return f"{type(self).__name__}({parameters})"

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
        :func:`codiemb_st.merging.streaming_merge.merge_model_folders` for the rules.

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
        return merge_and_load(
            self, checkpoints, base_model=base_model, output_path=output_path, show_progress_bar=show_progress_bar
        )

    def merge_to_folder(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        output_path: str | Path,
        *,
        base_model: str | Path | SentenceTransformer | None = None,
        show_progress_bar: bool = True,
    ) -> Path:
        """Like :meth:`merge`, but only write the merged folder (the model is not loaded) and return its path."""
        return merge_model_folders(
            self, checkpoints, output_path, base_model=base_model, show_progress_bar=show_progress_bar
        )


def check_weights(name: str, weights: Any) -> list[float]:
    """Per-checkpoint weights as a list of floats: finite, non-negative, at least one positive.

    Raises:
        TypeError: ``weights`` is not a sequence of numbers.
        ValueError: A weight is negative or not finite, or all are 0.
    """
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(f"{name} must be a sequence of numbers (one per checkpoint), got {type(weights).__name__}.")
    values = [float(check_finite_float(f"{name}[{i}]", w, minimum=0.0)) for i, w in enumerate(weights)]
    if not values or sum(values) <= 0:
        raise ValueError(f"{name} must hold at least one positive weight, got {values}.")
    return values


__all__ = ["MergeMethod", "check_weights"]
