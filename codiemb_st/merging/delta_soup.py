"""DeltaSoup, CoDiEmb's delta-guided fusion: per-parameter merging weights from how far each checkpoint moved from
the base, with sign-consensus and norm-rescaling variants; the class and its math."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from codiemb_st.merging.base import MergeMethod
from codiemb_st.validation import check_bool, check_choice, check_finite_float

Granularity = Literal["element", "row", "tensor"]
GRANULARITIES: tuple[str, ...] = ("element", "row", "tensor")


class DeltaSoup(MergeMethod, name="delta_soup"):
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
        with ``rescale``, a :class:`NormStatistics` holding those and the sums of
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
            statistics = self.statistics_of(checkpoints, base)
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


# ---------------------------------------------------------------------------------------------------------------------
# The math


def uniform_where_zero(scores: Tensor) -> Tensor:
    """Normalise non-negative scores over dim 0; where all K scores are 0, return 1/K (uniform)."""
    total = scores.sum(dim=0, keepdim=True)
    uniform = torch.full_like(total, 1.0 / scores.shape[0])
    return torch.where(total > 0, scores / torch.where(total > 0, total, 1.0), uniform)


def delta_log_statistics(statistics: Tensor | None, checkpoints: Tensor, base: Tensor, power: float) -> Tensor:
    """log Σ |δ_c|^p over the rows seen so far (folding in this slice), one float64 value per checkpoint."""
    magnitudes = (checkpoints - base).abs().flatten(start_dim=1).double()
    largest = magnitudes.max()
    if largest == 0:
        log_scores = torch.full((checkpoints.shape[0],), -math.inf, dtype=torch.float64)
    else:
        # log Σ|δ|^p = p log m + log Σ(|δ|/m)^p, with m the largest |δ|: no underflow for large p.
        log_scores = power * largest.log() + (magnitudes / largest).pow(power).sum(dim=1).log()
    return log_scores if statistics is None else torch.logaddexp(statistics, log_scores)


def delta_local_scores(deltas: Tensor, power: float, granularity: Granularity) -> Tensor:
    """Element- or row-wise scores proportional to |δ|^p (a fresh tensor), scaled by the largest |δ| of the group so
    that large powers do not underflow."""
    magnitudes = deltas.abs()
    # Row sums reduce over every dim after the row dim; 0-d/1-d tensors (dims (K,) or (K, n)) have none.
    row_dims = tuple(range(2, deltas.dim())) if granularity == "row" else ()
    if power != 1 or row_dims:
        largest = magnitudes.amax(dim=(0, *row_dims), keepdim=True)
        magnitudes = magnitudes.div_(torch.where(largest > 0, largest, 1.0))
        if power != 1:
            magnitudes = magnitudes.pow_(power)
    return magnitudes.sum(dim=row_dims, keepdim=True) if row_dims else magnitudes


def delta_weights(
    deltas: Tensor,
    power: float,
    granularity: Granularity,
    temperature: float | None,
    statistics: Tensor | None = None,
) -> Tensor:
    """DeltaSoup's merging weights w_c for deltas stacked along dim 0 (see :class:`~codiemb_st.merging.DeltaSoup`).

    Returns:
        Non-negative weights summing to 1 over dim 0, broadcastable to ``deltas``.
    """
    k = deltas.shape[0]
    if power == 0:
        scores = torch.ones((k,) + (1,) * (deltas.dim() - 1), dtype=deltas.dtype, device=deltas.device)
    elif granularity == "tensor":
        if statistics is None:
            statistics = delta_log_statistics(None, deltas, torch.zeros_like(deltas[0]), power)
        log_scores = statistics.to(torch.float64)
        if torch.isinf(log_scores).all():  # every delta is 0
            log_scores = torch.zeros_like(log_scores)
        scores = torch.softmax(log_scores, dim=0).to(deltas.dtype).reshape((k,) + (1,) * (deltas.dim() - 1))
    else:
        scores = delta_local_scores(deltas, power, granularity)
    weights = uniform_where_zero(scores)
    if temperature is not None:
        weights = torch.softmax(weights / temperature, dim=0)
    return weights


def sign_consensus_(deltas: Tensor) -> Tensor:
    """Zero, in place, every δ_c whose sign differs from the elected sign sign(Σ_c δ_c) (TIES-style election).

    Where Σ_c δ_c = 0 the elected sign is 0 and every delta of that parameter is zeroed. Returns ``deltas``.
    """
    elected = deltas.sum(dim=0).sign_()
    return deltas.mul_(deltas.sign() == elected)


def delta_soup_delta(
    deltas: Tensor,
    power: float,
    granularity: Granularity,
    temperature: float | None,
    statistics: Tensor | None = None,
) -> Tensor:
    """The merged delta Σ_c w_c ⊙ δ_c with DeltaSoup's weights (:func:`delta_weights`); overwrites ``deltas``."""
    if temperature is not None or power == 0 or granularity == "tensor":
        weights = delta_weights(deltas, power, granularity, temperature, statistics)
        return deltas.mul_(weights).sum(dim=0)
    # Σ_c w_c δ_c with w_c = s_c / Σ s computed as Σ_c s_c δ_c / Σ s, without materialising the weights.
    # Where Σ s = 0 every δ is 0, so the numerator is 0 and the result is 0.
    scores = delta_local_scores(deltas, power, granularity)
    total = scores.sum(dim=0)
    numerator = (scores.mul_(deltas) if scores.shape == deltas.shape else scores * deltas).sum(dim=0)
    return numerator.div_(total.clamp_min_(torch.finfo(total.dtype).tiny))


def delta_soup_rows(
    checkpoints: Tensor,
    base: Tensor,
    power: float,
    granularity: Granularity,
    temperature: float | None,
    statistics: Tensor | None = None,
    *,
    sign_consensus: bool = False,
    rescale_factor: float | None = None,
) -> Tensor:
    """θ = θ_0 + f · Σ_c w_c ⊙ (m_c ⊙ δ_c) with DeltaSoup's weights; overwrites ``checkpoints``.

    ``m_c`` is the sign-consensus mask (:func:`sign_consensus_`) when ``sign_consensus``, else 1; ``f`` is
    ``rescale_factor`` (:func:`rescale_factor`), else 1. With tensor granularity, ``statistics`` are the log-scores
    of the (masked) deltas of the whole tensor (:func:`delta_log_scores`).
    """
    deltas = checkpoints.sub_(base)  # the caller's scratch buffer becomes the deltas
    if sign_consensus:
        sign_consensus_(deltas)
    merged = delta_soup_delta(deltas, power, granularity, temperature, statistics)
    if rescale_factor is not None:
        merged.mul_(rescale_factor)
    return merged.add_(base)


def delta_log_scores(statistics: Tensor | None, deltas: Tensor, power: float) -> Tensor:
    """log Σ |δ_c|^p of deltas (not checkpoints) folded into ``statistics``; see :func:`delta_log_statistics`."""
    return delta_log_statistics(statistics, deltas, torch.zeros((), dtype=deltas.dtype), power)


@dataclass
class NormStatistics:
    """Per-tensor sums of squares for DeltaSoup's norm rescaling (float64).

    Attributes:
        log_scores: Tensor-granularity log-scores from a first pass (None when not needed).
        weights_done: Whether the log-score pass is finished (the norm pass runs after it).
        delta_squares: Σ δ_c² per checkpoint, shape ``(K,)``.
        merged_squares: Σ (Σ_c w_c δ_c)², a 0-d tensor.
        factor: The rescale factor, set when the norm pass is finished.
    """

    log_scores: Tensor | None = None
    weights_done: bool = False
    delta_squares: Tensor | None = None
    merged_squares: Tensor | None = None
    factor: float | None = None


def rescale_factor(delta_squares: Tensor, merged_squares: Tensor) -> float:
    """f = mean_c ‖δ_c‖ / ‖Σ_c w_c δ_c‖: restores the merged delta to the checkpoints' mean norm (1 if it is 0)."""
    merged_norm = float(merged_squares.sqrt())
    if merged_norm == 0:
        return 1.0
    return float(delta_squares.sqrt().mean()) / merged_norm


__all__ = [
    "GRANULARITIES",
    "DeltaSoup",
    "Granularity",
    "NormStatistics",
    "delta_local_scores",
    "delta_log_scores",
    "delta_log_statistics",
    "delta_soup_delta",
    "delta_soup_rows",
    "delta_weights",
    "rescale_factor",
    "sign_consensus_",
    "uniform_where_zero",
]
