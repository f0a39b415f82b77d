"""Merge methods: the per-tensor math of DeltaSoup, ModelSoup and TaskArithmetic, free of any I/O.

Every method is a pure function of the checkpoints' tensors (and the base tensor), exposed through
:meth:`MergeMethod.merge_tensors`. The same math runs on slices of rows (the leading dimension) when
:mod:`codiemb_st.merging.streaming_merge` streams large tensors from disk: :meth:`MergeMethod.merge_rows` merges one
slice, and methods whose weights depend on the whole tensor first collect per-tensor statistics slice by slice with
:meth:`MergeMethod.accumulate_statistics`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import Tensor

if TYPE_CHECKING:
    from codiemb_st._compat import SentenceTransformer

Granularity = Literal["element", "row", "tensor"]
GRANULARITIES: tuple[str, ...] = ("element", "row", "tensor")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the merge math runs in: float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _uniform_where_zero(scores: Tensor) -> Tensor:
    """Normalise non-negative scores over dim 0; where all K scores are 0, return 1/K (uniform)."""
    total = scores.sum(dim=0, keepdim=True)
    uniform = torch.full_like(total, 1.0 / scores.shape[0])
    return torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), uniform)


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
        """
        tensors = list(tensors)
        if not tensors:
            raise ValueError("tensors must hold at least one checkpoint tensor.")
        shape = tensors[0].shape
        for index, tensor in enumerate(tensors):
            if not isinstance(tensor, Tensor):
                raise TypeError(f"tensors[{index}] must be a torch.Tensor, got {type(tensor).__name__}.")
            if tensor.shape != shape:
                raise ValueError(f"tensors[{index}] has shape {tuple(tensor.shape)}, tensors[0] has {tuple(shape)}.")
            if not tensor.is_floating_point():
                raise TypeError(f"tensors[{index}] has dtype {tensor.dtype}; only floating-point tensors are merged.")
        if self.requires_base and base is None:
            raise ValueError(
                f"{type(self).__name__} needs base, the pre-trained tensor θ_0 the deltas are taken from."
            )
        if base is not None and base.shape != shape:
            raise ValueError(f"base has shape {tuple(base.shape)}, the checkpoint tensors have {tuple(shape)}.")

        if self.keeps_agreement and all(
            t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]) for t in tensors[1:]
        ):
            return tensors[0].clone()
        dtype = compute_dtype(tensors[0].dtype)
        # Row slices need a leading dim: a 0-d tensor is merged as one row of one element.
        stacked = torch.stack([tensor.to(dtype).reshape(shape or (1,)) for tensor in tensors])
        base_rows = None if base is None or not self.requires_base else base.to(dtype).reshape(shape or (1,))
        statistics = self.accumulate_statistics(None, stacked, base_rows) if self.needs_tensor_statistics else None
        return self.merge_rows(stacked, base_rows, statistics).reshape(shape).to(tensors[0].dtype)

    def get_config_dict(self) -> dict[str, Any]:
        """The method's parameters (written to ``merge_config.json`` next to a merged model)."""
        return {}

    def __repr__(self) -> str:
        parameters = ", ".join(f"{key}={value!r}" for key, value in self.get_config_dict().items())
        return f"{type(self).__name__}({parameters})"

    def merge(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        base: str | Path | SentenceTransformer | None = None,
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
            base: The pre-trained model the checkpoints were fine-tuned from (folder or object). Required by
                DeltaSoup and TaskArithmetic; ModelSoup only checks it is compatible.
            output_path: Where to write the merged model folder. It must not exist yet (or be an empty folder) and
                must not be, or lie inside, an input. With None, the folder is written to a temporary directory
                that is removed after loading.
            show_progress_bar: Show a progress bar per weight file.

        Returns:
            The merged ``SentenceTransformer``.
        """
        from codiemb_st.merging.streaming_merge import merge_and_load

        return merge_and_load(self, checkpoints, base, output_path, show_progress_bar)

    def merge_to_folder(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        output_path: str | Path,
        base: str | Path | SentenceTransformer | None = None,
        show_progress_bar: bool = True,
    ) -> Path:
        """Like :meth:`merge`, but only write the merged folder (the model is not loaded) and return its path."""
        from codiemb_st.merging.streaming_merge import merge_model_folders

        return merge_model_folders(self, checkpoints, base, output_path, show_progress_bar)


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
        return checkpoints.mean(dim=0)


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

            merged = TaskArithmetic(scale=0.5).merge(["runs/ir", "runs/sts"], base="base-model")
    """

    requires_base = True
    keeps_agreement = False

    def __init__(self, scale: float = 1.0) -> None:
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"scale must be a finite number, got {scale!r}.")
        self.scale = float(scale)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Tensor | None = None) -> Tensor:
        return checkpoints.sub_(base).sum(dim=0).mul_(self.scale).add_(base)

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
                base="models/base-encoder",
                output_path="models/codiemb-deltasoup",
            )
            embeddings = merged.encode(["一个查询", "a query"])
    """

    requires_base = True
    keeps_agreement = True

    def __init__(self, power: float = 1.0, granularity: Granularity = "element", temperature: float | None = None):
        if isinstance(power, bool) or not isinstance(power, (int, float)) or not math.isfinite(power) or power < 0:
            raise ValueError(f"power must be a finite number >= 0, got {power!r}.")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}.")
        if temperature is not None and (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature)
            or temperature <= 0
        ):
            raise ValueError(f"temperature must be None or a finite number > 0, got {temperature!r}.")
        self.power = float(power)
        self.granularity = granularity
        self.temperature = None if temperature is None else float(temperature)

    @property
    def needs_tensor_statistics(self) -> bool:
        return self.granularity == "tensor" and self.power != 0

    def accumulate_statistics(self, statistics: Tensor | None, checkpoints: Tensor, base: Tensor | None) -> Tensor:
        """Per-tensor statistics: log Σ |δ_c|^p over the rows seen so far, one float64 value per checkpoint."""
        magnitudes = (checkpoints - base).abs().flatten(start_dim=1).double()
        largest = magnitudes.max()
        if largest == 0:
            log_scores = torch.full((checkpoints.shape[0],), -math.inf, dtype=torch.float64)
        else:
            # log Σ|δ|^p = p log m + log Σ(|δ|/m)^p, with m the largest |δ|: no underflow for large p.
            log_scores = self.power * largest.log() + (magnitudes / largest).pow(self.power).sum(dim=1).log()
        return log_scores if statistics is None else torch.logaddexp(statistics, log_scores)

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
        k = deltas.shape[0]
        if self.power == 0:
            scores = torch.ones((k,) + (1,) * (deltas.dim() - 1), dtype=deltas.dtype, device=deltas.device)
        elif self.granularity == "tensor":
            if statistics is None:
                statistics = self.accumulate_statistics(None, deltas, torch.zeros_like(deltas[0]))
            log_scores = statistics.to(torch.float64)
            if torch.isinf(log_scores).all():  # every delta is 0
                log_scores = torch.zeros_like(log_scores)
            scores = torch.softmax(log_scores, dim=0).to(deltas.dtype).reshape((k,) + (1,) * (deltas.dim() - 1))
        else:
            scores = self._local_scores(deltas)
        weights = _uniform_where_zero(scores)
        if self.temperature is not None:
            weights = torch.softmax(weights / self.temperature, dim=0)
        return weights

    def _local_scores(self, deltas: Tensor) -> Tensor:
        """Element- or row-wise scores proportional to |δ|^p (a fresh tensor), scaled by the largest |δ| of the group
        so that large powers do not underflow."""
        magnitudes = deltas.abs()
        # Row sums reduce over every dim after the row dim; 0-d/1-d tensors (dims (K,) or (K, n)) have none.
        row_dims = tuple(range(2, deltas.dim())) if self.granularity == "row" else ()
        if self.power != 1 or row_dims:
            largest = magnitudes.amax(dim=(0, *row_dims), keepdim=True)
            magnitudes = magnitudes.div_(torch.where(largest > 0, largest, 1.0))
            if self.power != 1:
                magnitudes = magnitudes.pow_(self.power)
        return magnitudes.sum(dim=row_dims, keepdim=True) if row_dims else magnitudes

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Tensor | None = None) -> Tensor:
        deltas = checkpoints.sub_(base)  # the caller's scratch buffer becomes the deltas
        if self.temperature is not None or self.power == 0 or self.granularity == "tensor":
            weights = self.merging_weights(deltas, statistics)
            return deltas.mul_(weights).sum(dim=0).add_(base)
        # Σ_c w_c δ_c with w_c = s_c / Σ s computed as Σ_c s_c δ_c / Σ s, without materialising the weights.
        # Where Σ s = 0 every δ is 0, so the numerator is 0 and the result is the base.
        scores = self._local_scores(deltas)
        total = scores.sum(dim=0)
        numerator = (scores.mul_(deltas) if scores.shape == deltas.shape else scores * deltas).sum(dim=0)
        return numerator.div_(total.clamp_min_(torch.finfo(total.dtype).tiny)).add_(base)

    def get_config_dict(self) -> dict[str, Any]:
        return {"power": self.power, "granularity": self.granularity, "temperature": self.temperature}
