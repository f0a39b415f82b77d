"""Merge methods: DeltaSoup (CoDiEmb's delta-guided fusion), ModelSoup, TaskArithmetic, ModelStock and TIES (SLERP and
MultiSLERP: :mod:`~codiemb_st.merging.spherical`; the base class: :mod:`~codiemb_st.merging.base`) — the
public data-free merge API (:class:`~codiemb_st.merging.greedy_soup.GreedySoup`, which needs an evaluator, builds on
these).

Each method is a small object holding its parameters. Its math is the pure per-tensor functions of
:mod:`codiemb_st.merging.tensor_math` (exposed as :meth:`MergeMethod.merge_tensors` and, on row slices,
:meth:`MergeMethod.merge_rows`); :meth:`MergeMethod.merge` and :meth:`MergeMethod.merge_to_folder` stream
sentence-transformers model folders through that math with :mod:`codiemb_st.merging.streaming_merge`. Layering, one
way: ``tensor_math`` (no I/O) <- ``streaming_merge`` (I/O) <- ``methods`` (this module).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from codiemb_st.merging.base import MergeMethod, check_weights  # noqa: F401 (re-exported: the old import path)
from codiemb_st.merging.spherical import SLERP, MultiSLERP
from codiemb_st.merging.tensor_math import (
    GRANULARITIES,
    Granularity,
    NormStatistics,
    RadixSelectState,
    delta_gram,
    delta_log_scores,
    delta_soup_delta,
    delta_soup_rows,
    delta_weights,
    model_soup_rows,
    model_stock_ratio,
    model_stock_rows,
    rescale_factor,
    sign_consensus_,
    task_arithmetic_rows,
    ties_rows,
    topk_threshold_accumulate,
    topk_threshold_finish,
)
from codiemb_st.validation import check_bool, check_choice, check_finite_float


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

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        return model_soup_rows(checkpoints)


class TaskArithmetic(MergeMethod):
    """Task arithmetic (Ilharco et al., 2023): θ = θ_0 + λ Σ_c (θ_c − θ_0), the base plus the scaled sum of deltas.

    With ``scale = 1/K`` this equals the uniform Model Soup.

    Args:
        scale: λ, the factor applied to the sum of the task vectors. Defaults to 1.0 (the plain sum, as in the paper
            and in mergekit's ``task_arithmetic``); values around 0.3-0.5 are common in practice. With one checkpoint
            and λ ∉ {0, 1}, the merge is θ_0 + λ · δ (e.g. half a fine-tune); at λ = 1 (or 0) one checkpoint would
            come out as a copy of itself (or of the base), which is refused.

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

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        return task_arithmetic_rows(checkpoints, base, self.scale)

    def one_checkpoint_copies(self) -> str | None:
        """One checkpoint gives θ_0 + λ · δ: the checkpoint at λ = 1, the base at λ = 0, a new model otherwise."""
        return {1.0: "checkpoint", 0.0: "base"}.get(float(self.scale))

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

    Variants (off by default; measured in ``benchmarks/fusion_study.py``, see docs/results/fusion-study.md):

    - ``sign_consensus``: TIES-style sign election before weighting. With the elected sign
      s = sign(Σ_c δ_c) per parameter and the mask m_c = 1[sign(δ_c) = s], the merge is
      θ = θ_0 + Σ_c w_c ⊙ (m_c ⊙ δ_c), the weights computed from the masked deltas m_c ⊙ δ_c (element-wise:
      w_c = m_c |δ_c|^p / Σ_c' m_c' |δ_c'|^p), so checkpoints that pull a parameter against the majority do not
      cancel it out. Where Σ_c δ_c = 0 the parameter stays at θ_0.
    - ``rescale``: per tensor, scale the merged delta back to the checkpoints' mean delta norm,
      θ = θ_0 + f · Σ_c w_c ⊙ δ_c with f = mean_c ‖δ_c‖ / ‖Σ_c w_c ⊙ δ_c‖ (f = 1 where the merged delta is 0):
      averaging deltas that point in different directions shrinks them (interference), and this undoes the
      shrinkage. Needs whole-tensor statistics (one extra read of each tensor).
    - Layer-wise statistics are ``granularity="tensor"``: one weight per checkpoint and tensor.

    Measured (``benchmarks/fusion_study.py``, README "Fusion study"): no weighting beat the uniform
    :class:`ModelSoup` on dev *and* test on both tracks. On the study's own en ingredients the element-wise default
    trailed it in every checkpoint set (by more than the noise for seed and learning-rate soups) and
    ``granularity="tensor"`` tied it when the runs were alike; on the reproduction's runs, paired by seed, the
    default was +0.16 ± 0.05 points on en dev but −0.10 ± 0.11 on en test, and tied on zh (dev −0.21 ± 0.41, test
    +0.02 ± 0.02). For data-free merging prefer :class:`ModelSoup`; with a dev set, ``GreedySoup``.

    Scores are computed relative to the largest |δ| of the group, so a large power does not underflow. Where all
    deltas are 0 the weights are uniform (and the result is θ_0). Tensors on which all checkpoints agree are returned
    unchanged, so K = 1 returns the checkpoint. The math runs in float32 (float64 for float64 weights).

    Args:
        power: The exponent p >= 0 applied to |δ|. Defaults to 1.0.
        granularity: ``"element"`` (default), ``"row"`` or ``"tensor"``.
        temperature: Optional softmax temperature T > 0 applied to the normalised scores. Defaults to None (use the
            normalised scores directly).
        sign_consensus: Mask the deltas that disagree with the elected sign first (see above). Defaults to False.
        rescale: Rescale each tensor's merged delta to the checkpoints' mean delta norm (see above). Defaults to
            False.

    References:
        - Zhang et al., "CoDiEmb: A Collaborative yet Distinct Framework for Unified Representation Learning in
          Information Retrieval and Semantic Textual Similarity", 2025. https://arxiv.org/abs/2508.11442
        - Wortsman et al., "Model soups", ICML 2022 (the uniform baseline, :class:`ModelSoup`).
        - Yadav et al., "TIES-Merging", NeurIPS 2023 (the sign election of ``sign_consensus``).

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

    def __init__(
        self,
        power: float = 1.0,
        granularity: Granularity = "element",
        temperature: float | None = None,
        sign_consensus: bool = False,
        rescale: bool = False,
    ) -> None:
        power = check_finite_float("power", power, minimum=0.0)
        check_choice("granularity", granularity, GRANULARITIES)
        if temperature is not None:
            temperature = check_finite_float("temperature", temperature, minimum=0.0, strict_minimum=True)
        self.power = float(power)
        self.granularity = granularity
        self.temperature = None if temperature is None else float(temperature)
        self.sign_consensus = check_bool("sign_consensus", sign_consensus)
        self.rescale = check_bool("rescale", rescale)
        # Rescaling multiplies a whole tensor by one factor, so a row slice on which all checkpoints agree is not
        # returned unchanged: it must go through the math, not be copied.
        self.keeps_agreement = not self.rescale

    @property
    def _tensor_weights(self) -> bool:
        return self.granularity == "tensor" and self.power != 0

    @property
    def needs_tensor_statistics(self) -> bool:
        return self._tensor_weights or self.rescale

    def _deltas(self, checkpoints: Tensor, base: Tensor) -> Tensor:
        deltas = checkpoints - base  # a fresh tensor: statistics passes must not modify the slice
        return sign_consensus_(deltas) if self.sign_consensus else deltas

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> Any:
        """Per-tensor statistics: log Σ |δ_c|^p per checkpoint (tensor granularity; a float64 tensor ``(K,)``);
        with ``rescale``, a :class:`~codiemb_st.merging.tensor_math.NormStatistics` holding those and the sums of
        squares of the deltas and of the merged delta."""
        deltas = self._deltas(checkpoints, base)
        if not self.rescale:
            return delta_log_scores(statistics, deltas, self.power)
        state = statistics if statistics is not None else NormStatistics(weights_done=not self._tensor_weights)
        if not state.weights_done:
            state.log_scores = delta_log_scores(state.log_scores, deltas, self.power)
            return state
        squares = deltas.flatten(start_dim=1).double().pow(2).sum(dim=1)
        merged = delta_soup_delta(deltas, self.power, self.granularity, self.temperature, state.log_scores)
        merged_squares = merged.double().pow(2).sum()
        state.delta_squares = squares if state.delta_squares is None else state.delta_squares + squares
        state.merged_squares = (
            merged_squares if state.merged_squares is None else state.merged_squares + merged_squares
        )
        return state

    def finish_statistics_pass(self, statistics: Any) -> tuple[Any, bool]:
        if not self.rescale:
            return statistics, False
        if not statistics.weights_done:  # the log-score pass is done: pass again for the norms
            statistics.weights_done = True
            return statistics, True
        statistics.factor = rescale_factor(statistics.delta_squares, statistics.merged_squares)
        return statistics, False

    def merging_weights(self, deltas: Tensor, statistics: Tensor | None = None) -> Tensor:
        """The merging weights w_c for deltas δ_c stacked along dim 0 (before ``sign_consensus`` masking).

        Args:
            deltas: The task vectors δ_c = θ_c − θ_0 stacked along dim 0, shape ``(K, ...)``, floating point.
            statistics: For ``granularity="tensor"`` on a slice of rows: the statistics of the whole tensor from
                :meth:`accumulate_statistics`. Computed from ``deltas`` when None.

        Returns:
            Non-negative weights summing to 1 over dim 0, broadcastable to ``deltas``: shape ``(K, ...)`` for element,
            ``(K, rows, 1, ...)`` for row and ``(K, 1, ...)`` for tensor granularity.
        """
        if isinstance(statistics, NormStatistics):
            statistics = statistics.log_scores
        return delta_weights(deltas, self.power, self.granularity, self.temperature, statistics)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        if statistics is None and self.rescale:  # the rows are the whole tensor
            statistics = self._statistics_of(checkpoints, base)
        factor = None
        if isinstance(statistics, NormStatistics):
            statistics, factor = statistics.log_scores, statistics.factor
        return delta_soup_rows(
            checkpoints,
            base,
            self.power,
            self.granularity,
            self.temperature,
            statistics,
            sign_consensus=self.sign_consensus,
            rescale_factor=factor,
        )

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "power": self.power,
            "granularity": self.granularity,
            "temperature": self.temperature,
        }
        # The variants appear only when switched on, so the default's configuration (and repr) stays as it was.
        config |= {name: True for name in ("sign_consensus", "rescale") if getattr(self, name)}
        return config


class ModelStock(MergeMethod):
    """Model Stock (Jang et al., ECCV 2024): interpolate between the checkpoints' average and the base, per tensor,
    by how much the checkpoints' deltas agree in direction.

    For K >= 2 checkpoints with deltas δ_c = θ_c − θ_0, per tensor:

        cos = mean over pairs i < j of  ⟨δ_i, δ_j⟩ / (‖δ_i‖ ‖δ_j‖)
        t   = K · cos / (1 + (K − 1) · cos)
        θ   = t · (1/K) Σ_c θ_c + (1 − t) · θ_0

    Deltas that agree (cos → 1) give t → 1, the plain average; nearly orthogonal deltas (the usual case for
    independent fine-tuning runs) give a small t, pulling the average towards the base, where the paper finds the
    centre of the fine-tuned weights' distribution lies.

    **cos <= 0**: the formula has a pole at cos = −1/(K − 1) and gives t < 0 (extrapolating away from the
    checkpoints) for any negative cos, which the paper's geometry does not cover. cos is therefore clipped to
    [0, 1], so t ∈ [0, 1]: a tensor whose deltas are orthogonal or opposed on average stays at θ_0 (t = 0). A pair
    with a zero delta (a tensor one checkpoint did not change) counts as cos 0. A tensor no checkpoint changed stays
    at θ_0.

    The cosines need the whole tensor, so when streaming each tensor is read twice: first the K × K Gram matrix of
    the deltas is accumulated slice by slice (float64), then the tensor is merged. Unlike the paper's two-checkpoint
    procedure (which fine-tunes exactly two models and uses their angle), K may be any number >= 2, as in mergekit's
    ``model_stock``.

    References:
        - Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024.
          https://arxiv.org/abs/2403.19522

    Example:
        ::

            from codiemb_st.merging import ModelStock

            merged = ModelStock().merge(["runs/seed1", "runs/seed2", "runs/seed3"], base_model="models/base")
    """

    requires_base = True
    # Slices where the checkpoints agree still move by the tensor's ratio t (< 1 unless the deltas are parallel).
    keeps_agreement = False
    min_checkpoints = 2

    @property
    def needs_tensor_statistics(self) -> bool:
        return True

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> Tensor:
        """The K × K Gram matrix Σ δ_i · δ_j of the deltas over the rows seen so far (float64)."""
        return delta_gram(statistics, checkpoints, base)

    def interpolation_ratio(self, gram: Tensor) -> float:
        """The ratio t of a tensor from the Gram matrix of its deltas (see the class docstring)."""
        return model_stock_ratio(gram)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        if statistics is None:  # the rows are the whole tensor
            statistics = self._statistics_of(checkpoints, base)
        return model_stock_rows(checkpoints, base, model_stock_ratio(statistics))


class TIES(MergeMethod):
    """TIES-Merging (Yadav et al., NeurIPS 2023): trim, elect sign, disjoint merge.

    For K checkpoints with deltas δ_c = θ_c − θ_0, per tensor:

    1. **Trim**: keep each δ_c's top-``density`` fraction of entries by magnitude, zero the rest:
       δ̂_c = δ_c ⊙ 1[|δ_c| >= τ_c], with τ_c the k-th largest |δ_c| of the tensor, k = ceil(density · numel).
    2. **Elect**: s = sign(Σ_c δ̂_c) per parameter.
    3. **Disjoint mean**: m = Σ_c δ̂_c 1[sign(δ̂_c) = s, δ̂_c ≠ 0] / #{c : sign(δ̂_c) = s, δ̂_c ≠ 0} (0 where no
       checkpoint agrees).
    4. θ = θ_0 + λ · m, with λ = ``scale``.

    **Exact top-k while streaming**: τ_c is the exact k-th largest |δ_c| of the whole tensor, found without holding
    the tensor: non-negative floats order like their bit patterns, so a radix select histograms 16 bits of the
    magnitudes per pass (65,536 counters per checkpoint) and narrows to the k-th value digit by digit — two reads of
    each tensor for float32/float16/bfloat16 weights (merged in float32), four for float64, then the merge read.
    Memory stays at a few row slices whatever the tensor size; the result equals sorting each full tensor. Entries
    tied with τ_c are all kept (so slightly more than k survive when magnitudes repeat, e.g. where a tensor's deltas
    are mostly 0). With ``density=1`` nothing is trimmed and no statistics pass is made.

    Args:
        density: The fraction of each delta's entries kept, in (0, 1]. Defaults to 0.2 (the paper's top-20%).
        scale: λ, applied to the merged delta. Defaults to 1.0 (the paper tunes it in [0.8, 1.8]).

    References:
        - Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023.
          https://arxiv.org/abs/2306.01708

    Example:
        ::

            from codiemb_st.merging import TIES

            merged = TIES(density=0.2).merge(["runs/ir", "runs/sts", "runs/joint"], base_model="models/base")
    """

    requires_base = True
    # Identical checkpoints are trimmed to their top fraction: the result is not the checkpoint.
    keeps_agreement = False

    def __init__(self, density: float = 0.2, scale: float = 1.0) -> None:
        self.density = float(check_finite_float("density", density, minimum=0.0, maximum=1.0, strict_minimum=True))
        self.scale = float(check_finite_float("scale", scale))

    @property
    def needs_tensor_statistics(self) -> bool:
        return self.density < 1

    def accumulate_statistics(self, statistics: Any, checkpoints: Tensor, base: Tensor | None) -> RadixSelectState:
        """One slice into the current radix-select pass of the per-checkpoint top-k magnitude thresholds."""
        return topk_threshold_accumulate(statistics, checkpoints, base, self.density)

    def finish_statistics_pass(self, statistics: Any) -> tuple[Any, bool]:
        return topk_threshold_finish(statistics)

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        if statistics is None and self.needs_tensor_statistics:  # the rows are the whole tensor
            statistics = self._statistics_of(checkpoints, base)
        thresholds = None if statistics is None else statistics.thresholds
        return ties_rows(checkpoints, base, thresholds, self.scale)

    def one_checkpoint_copies(self) -> str | None:
        """One checkpoint gives θ_0 + λ · trim(δ) (one sign, so the election keeps it): the base at λ = 0, the
        checkpoint at λ = 1 and ``density=1``, a new model otherwise (a trimmed or scaled task vector)."""
        if self.scale == 0:
            return "base"
        return "checkpoint" if self.scale == 1 and self.density == 1 else None

    def get_config_dict(self) -> dict[str, Any]:
        return {"density": self.density, "scale": self.scale}


#: The data-free merge methods by their command-line name (``codiemb-st merge --method NAME``).
MERGE_METHODS: dict[str, type[MergeMethod]] = {
    "delta_soup": DeltaSoup,
    "model_soup": ModelSoup,
    "model_stock": ModelStock,
    "multi_slerp": MultiSLERP,
    "slerp": SLERP,
    "task_arithmetic": TaskArithmetic,
    "ties": TIES,
}
