"""Merge methods: DeltaSoup (CoDiEmb's delta-guided fusion), ModelSoup and TaskArithmetic — the public merge API.

Each method is a small object holding its parameters. Its math is the pure per-tensor functions of
:mod:`codiemb_st.merging.tensor_math` (exposed as :meth:`MergeMethod.merge_tensors` and, on row slices,
:meth:`MergeMethod.merge_rows`); :meth:`MergeMethod.merge` and :meth:`MergeMethod.merge_to_folder` stream
sentence-transformers model folders through that math with :mod:`codiemb_st.merging.streaming_merge`. Layering, one
way: ``tensor_math`` (no I/O) <- ``streaming_merge`` (I/O) <- ``methods`` (this module).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from codiemb_st.merging.streaming_merge import merge_and_load, merge_model_folders
from codiemb_st.merging.tensor_math import (
    GRANULARITIES,
    Granularity,
    delta_log_statistics,
    delta_soup_rows,
    delta_weights,
    merge_whole_tensor,
    model_soup_rows,
    task_arithmetic_rows,
)
from codiemb_st.validation import check_choice, check_finite_float

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
    keeps_agreement: ClassVar[bool] = True

    @property
    def needs_tensor_statistics(self) -> bool:
        """Whether the weights of a row depend on the whole tensor (then tensors are read twice when streamed)."""
        return False

    def accumulate_statistics(self, statistics: Tensor | None, checkpoints: Tensor, base: Tensor | None) -> Tensor:
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
    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Tensor | None = None) -> Tensor:
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
        ``checkpoints[0]``; see :func:`codiemb_st.merging.streaming_merge.merge_model_folders` for the rules.

        Args:
            checkpoints: The K >= 1 fine-tuned models: sentence-transformers model folders (safetensors weights) or
                ``SentenceTransformer`` objects (saved to a temporary folder first).
            base_model: The pre-trained model the checkpoints were fine-tuned from (folder or object). Required by
                DeltaSoup and TaskArithmetic; ModelSoup only checks it is compatible.
            output_path: Where to write the merged model folder. It must not exist yet (or be an empty folder) and
                must not be, or lie inside, an input. With None, the folder is written to a temporary directory
                that is removed after loading.
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


class ModelSoup(MergeMethod):
    """Uniform Model Soup (Wortsman et al., 2022): the element-wise mean of the checkpoints, θ = (1/K) Σ_c θ_c.

    The base model is not used; when given to :meth:`merge`, it is only checked for compatibility.

    References:
        - Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
          increasing inference time", ICML 2022. https://arxiv.org/abs/2203.05482

    Example:
        ::

            from codiemb_st.merging import ModelSoup

            merged = ModelSoup().merge(["runs/ir", "runs/sts", "runs/joint"], output_path="merged-soup")
    """

    requires_base = False
    keeps_agreement = True

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Tensor | None = None) -> Tensor:
        return model_soup_rows(checkpoints)


class TaskArithmetic(MergeMethod):
    """Task arithmetic (Ilharco et al., 2023): θ = θ_0 + λ Σ_c (θ_c − θ_0), the base plus the scaled sum of deltas.

    With ``scale = 1/K`` this equals the uniform Model Soup.

    Args:
        scale: λ, the factor applied to the sum of the task vectors. Defaults to 1.0 (the plain sum, as in the paper
            and in mergekit's ``task_arithmetic``); values around 0.3-0.5 are common in practice.

    References:
        - Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023. https://arxiv.org/abs/2212.04089

    Example:
        ::

            from codiemb_st.merging import TaskArithmetic

            merged = TaskArithmetic(scale=0.5).merge(["runs/ir", "runs/sts"], base_model="base-model")
    """

    requires_base = True
    keeps_agreement = False

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = check_finite_float("scale", scale)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Tensor | None = None) -> Tensor:
        return task_arithmetic_rows(checkpoints, base, self.scale)

    def get_config_dict(self) -> dict[str, Any]:
        return {"scale": self.scale}


class DeltaSoup(MergeMethod):
    """Delta-guided model fusion (CoDiEmb): weight each checkpoint per parameter by how far it moved from the base.

    For K checkpoints θ_c fine-tuned from θ_0, with task vectors δ_c = θ_c − θ_0, the merge is

        θ = θ_0 + Σ_c w_c ⊙ δ_c,    with Σ_c w_c = 1 at every parameter.

    **The default** (``power=1.0, granularity="element", temperature=None``) computes, for every scalar parameter,

        w_c = |δ_c| / Σ_c' |δ_c'|        (w_c = 1/K where every δ is 0),

    so each parameter is a convex combination of the checkpoints' values, pulled towards the checkpoints that moved
    it most. The paper (arXiv 2508.11442) describes the method only as "fine-grained merging weights computed from
    each parameter's deviation from its pre-trained initialization"; its exact formula and code are not published,
    so this is one definition consistent with that description (see the project's METHOD.md), with the weighting
    left to choose:

    - ``power`` p: scores s_c = |δ_c|^p. p = 0 gives uniform weights (the uniform Model Soup), p = 1 the default,
      larger p moves towards picking the checkpoint with the largest change (p → ∞: "max-magnitude selection").
    - ``granularity``: what one weight covers. ``"element"``: every scalar parameter has its own weights.
      ``"row"``: one weight per checkpoint and row of a tensor (dim 0: an output neuron of a Linear layer, a token of
      an embedding matrix), from the row sums Σ_j |δ_c[r, j]|^p; 0-d and 1-d tensors (biases, LayerNorm) fall back to
      element-wise. ``"tensor"``: one weight per checkpoint and tensor, from Σ |δ_c|^p over the whole tensor.
    - ``temperature`` T: by default the weights are the normalised scores r_c = s_c / Σ_c' s_c'. With a temperature,
      they are softmax_c(r_c / T) instead: T → 0 picks the largest score, large T tends to uniform weights, and no
      checkpoint ever gets weight 0.

    Scores are computed relative to the largest |δ| of the group, so a large power does not underflow. Where all
    deltas are 0 the weights are uniform (and the result is θ_0). Tensors on which all checkpoints agree are returned
    unchanged, so K = 1 returns the checkpoint. The math runs in float32 (float64 for float64 weights).

    Args:
        power: The exponent p >= 0 applied to |δ|. Defaults to 1.0.
        granularity: ``"element"`` (default), ``"row"`` or ``"tensor"``.
        temperature: Optional softmax temperature T > 0 applied to the normalised scores. Defaults to None (use the
            normalised scores directly).

    References:
        - Zhang et al., "CoDiEmb: A Collaborative yet Distinct Framework for Unified Representation Learning in
          Information Retrieval and Semantic Textual Similarity", 2025. https://arxiv.org/abs/2508.11442
        - Wortsman et al., "Model soups", ICML 2022 (the uniform baseline, :class:`ModelSoup`).

    Example:
        ::

            from codiemb_st.merging import DeltaSoup

            merged = DeltaSoup().merge(
                ["runs/codiemb-seed1", "runs/codiemb-seed2", "runs/codiemb-ir-heavy"],
                base_model="models/base-encoder",
                output_path="models/codiemb-deltasoup",
            )
            embeddings = merged.encode(["一个查询", "a query"])
    """

    requires_base = True
    keeps_agreement = True

    def __init__(self, power: float = 1.0, granularity: Granularity = "element", temperature: float | None = None):
        power = check_finite_float("power", power, minimum=0.0)
        check_choice("granularity", granularity, GRANULARITIES)
        if temperature is not None:
            temperature = check_finite_float("temperature", temperature, minimum=0.0, strict_minimum=True)
        self.power = float(power)
        self.granularity = granularity
        self.temperature = None if temperature is None else float(temperature)

    @property
    def needs_tensor_statistics(self) -> bool:
        return self.granularity == "tensor" and self.power != 0

    def accumulate_statistics(self, statistics: Tensor | None, checkpoints: Tensor, base: Tensor | None) -> Tensor:
        """Per-tensor statistics: log Σ |δ_c|^p over the rows seen so far, one float64 value per checkpoint."""
        return delta_log_statistics(statistics, checkpoints, base, self.power)

    def merging_weights(self, deltas: Tensor, statistics: Tensor | None = None) -> Tensor:
        """The merging weights w_c for deltas δ_c stacked along dim 0.

        Args:
            deltas: The task vectors δ_c = θ_c − θ_0 stacked along dim 0, shape ``(K, ...)``, floating point.
            statistics: For ``granularity="tensor"`` on a slice of rows: the statistics of the whole tensor from
                :meth:`accumulate_statistics`. Computed from ``deltas`` when None.

        Returns:
            Non-negative weights summing to 1 over dim 0, broadcastable to ``deltas``: shape ``(K, ...)`` for element,
            ``(K, rows, 1, ...)`` for row and ``(K, 1, ...)`` for tensor granularity.
        """
        return delta_weights(deltas, self.power, self.granularity, self.temperature, statistics)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Tensor | None = None) -> Tensor:
        return delta_soup_rows(checkpoints, base, self.power, self.granularity, self.temperature, statistics)

    def get_config_dict(self) -> dict[str, Any]:
        return {"power": self.power, "granularity": self.granularity, "temperature": self.temperature}


#: The data-free merge methods by their command-line name (``codiemb-st merge --method NAME``).
MERGE_METHODS: dict[str, type[MergeMethod]] = {
    "delta_soup": DeltaSoup,
    "model_soup": ModelSoup,
    "task_arithmetic": TaskArithmetic,
}
