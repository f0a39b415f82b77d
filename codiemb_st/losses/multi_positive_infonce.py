from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
import tqdm
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from codiemb_st import validation
from codiemb_st._compat import (
    CachedLossMixin,
    SentenceTransformer,
    all_gather,
    all_gather_with_grad,
    get_rank,
    get_world_size,
    has_static_embedding_input,
    is_dist_initialized,
    minibatch_ranges,
)
from codiemb_st.citation import CODIEMB_CITATION
from codiemb_st.losses import _input_checks, _teacher_terms, length_order
from codiemb_st.losses._autocast_replay import AutocastReplayMixin
from codiemb_st.losses._cached_gradients import KeptGraphsMixin
from codiemb_st.losses._sharding import check_gradient_caching_supported
from codiemb_st.losses.column_check import check_ir_columns
from codiemb_st.losses.text_identity import hash_columns

logger = logging.getLogger(__name__)


def _whole_column(feature: dict[str, Any], begin: int, end: int) -> dict[str, Any]:
    return feature


def _trimmed_rows(feature: dict[str, Any], begin: int, end: int) -> dict[str, Any]:
    # Trailing padding trimmed to the rows' own longest text; leading (left) padding kept, so positions stay.
    return length_order.chunk_feature(feature, begin, end, keep_positions=False)


class MultiPositiveCachedInfoNCELoss(AutocastReplayMixin, KeptGraphsMixin, CachedLossMixin, nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        num_positives: int = 1,
        temperature: float = 0.02,
        mini_batch_size: int = 32,
        gather_across_devices: bool = False,
        objective: Literal["per_slot", "joint"] = "per_slot",
        mask_duplicates: bool = True,
        mini_batch_num_tokens: int | None = None,
        show_progress_bar: bool = False,
        keep_graphs: int = 1,
        sort_by_length: bool = True,
        in_batch_negatives: bool = True,
        directions: tuple[Literal["query_to_doc", "query_to_query", "doc_to_query", "doc_to_doc"], ...] = (
            "query_to_doc",
        ),
        partition_mode: Literal["joint", "per_direction"] = "joint",
        hardness_mode: Literal["in_batch_negatives", "hard_negatives", "all_negatives"] | None = None,
        hardness_strength: float = 0.0,
        distillation_weight: float = 0.0,
        student_temperature: float | None = None,
        teacher_temperature: float = 1.0,
        guide: SentenceTransformer | None = None,
        margin_strategy: Literal["absolute", "relative"] = "absolute",
        margin: float = 0.0,
    ) -> None:
        """
        Multi-positive InfoNCE with hard and cross-device negatives, the IR objective of CoDiEmb
        (https://arxiv.org/abs/2508.11442), with GradCache (https://arxiv.org/abs/2101.06983) so that memory stays
        flat as the batch grows.

        Each query comes with ``num_positives`` relevant passages (``positive_1 .. positive_P``) and any number of
        hard negatives (``negative_1 .. negative_N``). With the default ``objective="per_slot"`` (the official
        CoDiEmb loss), for each positive slot ``k`` every query ``i`` scores a softmax over the k-th positive of
        every query in the (global) batch plus the hard negatives of every query, and the loss is
        ``-log softmax`` at its own k-th positive, averaged over queries and then over slots::

            L = 1/P Σ_k 1/B Σ_i -log( exp(s(q_i, p_ik)/τ) / Σ_j [exp(s(q_i, p_jk)/τ) + Σ_m exp(s(q_i, n_jm)/τ)] )

        with ``s`` the cosine similarity. A query's own other positives never appear in its denominator. For
        ``num_positives=1`` this is exactly
        :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` with
        ``scale = 1 / temperature`` (before duplicate masking). ``objective="joint"`` instead puts all of a query's
        positives in one numerator over one softmax over every positive and negative of the batch:
        ``-log(Σ_k exp(s(q_i, p_ik)/τ) / Σ_all exp(s(q_i, c)/τ))`` (an earlier variant of the official code).

        Unlike :class:`~sentence_transformers.sentence_transformer.losses.CachedMultipleNegativesRankingLoss`, a second
        positive column is treated as a positive, not silently as a negative.

        Args:
            model: SentenceTransformer model.
            num_positives: Number of positive columns ``P`` after the anchor column. Every column after them is a
                hard negative. The official CoDiEmb setting is 2 (with 4 hard negatives).
            temperature: Softmax temperature ``τ`` applied to cosine similarities (``scale = 1 / τ``). The
                official CoDiEmb value is 0.02.
            mini_batch_size: Number of texts embedded at once in the GradCache passes and number of query rows
                scored at once. Bounds memory; larger is faster. It does not change the loss or its gradients.
            gather_across_devices: If True, gather the candidates (positives and hard negatives) of every rank
                with gradients, so every query is scored against the global batch (cross-device negatives).
                Every rank must have the same per-device batch size and number of columns (use
                ``dataloader_drop_last=True``). Ignored, with a warning, when ``torch.distributed`` is not
                initialized.
            objective: ``"per_slot"`` (default, the official CoDiEmb loss) or ``"joint"`` (all positives in one
                numerator).
            mask_duplicates: If True (default), a candidate whose *input* (token ids) is identical to one of the
                query's own positives is removed from that query's denominator: when two queries share a passage
                it is not a negative for either of them. Identity is decided on the token ids after truncation,
                never on embeddings (dropout makes the embeddings of one text differ).
            mini_batch_num_tokens: If set, embedding mini-batches are packed by number of non-padding tokens
                instead of ``mini_batch_size`` sequences (see
                :class:`~sentence_transformers.sentence_transformer.losses.CachedMultipleNegativesRankingLoss`).
            show_progress_bar: If True, show progress bars over mini-batches.
            keep_graphs: How much of the first pass to keep instead of recomputing it (see "Passes" below), in
                mini-batch graphs: when a step needs several mini-batches, the last ``keep_graphs`` of them (in
                column order) are embedded with gradients in the first pass and back-propagated from that graph,
                not re-embedded. The first kept graph costs no extra peak memory; each further one holds the
                activations of one more mini-batch. ``0`` gives sentence-transformers' plain two-pass GradCache in
                every case (also when the step fits in one mini-batch). Loss and gradients never depend on it.
            sort_by_length: If True (default), embed every column in length-sorted chunks (see "Length-aware
                embedding" below). Loss and gradients do not depend on it (up to floating-point rounding); set it to
                False to embed the columns in their own row order, as sentence-transformers' cached losses do.
            in_batch_negatives: If False, each query is scored against its own positives and hard negatives only,
                not against the other queries' (FlagEmbedding's ``no_in_batch_neg`` data, e.g. classification
                labels as passages, where the other rows are often false negatives). Needs hard-negative columns.
            directions: Which similarity terms enter the softmax, with sentence-transformers 6.3's meaning
                (:class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss`):
                ``"query_to_doc"`` (required: the query against the documents), ``"query_to_query"`` (the query
                against the other queries), ``"doc_to_query"`` (the positive against every query; its own query is the
                target) and ``"doc_to_doc"`` (the positive against the other rows' documents). The GTE "improved
                contrastive loss" is all four with ``partition_mode="joint"``. See "Directions with several positives"
                below. Needs ``objective="per_slot"`` and in-batch negatives when it holds more than
                ``"query_to_doc"``.
            partition_mode: ``"joint"`` (default: one softmax over every selected direction) or ``"per_direction"``
                (one softmax per direction, their losses averaged; not with ``"query_to_query"``/``"doc_to_doc"``,
                whose candidates do not include the positive).
            hardness_mode: ``None`` (default: off), ``"in_batch_negatives"`` (the other rows' candidates, LLaVE),
                ``"hard_negatives"`` (the row's own hard negatives, EmbeddingGemma) or ``"all_negatives"`` (every
                query-to-document logit but the row's own positives): those logits get ``hardness_strength *
                stop_grad(cos)`` added after the temperature scaling, as in sentence-transformers 6.3.
            hardness_strength: ``alpha`` of the hardness penalty, >= 0 (LLaVE uses 9, EmbeddingGemma 5).
            distillation_weight: Weight of the distillation term (default 0: off): ``weight * KL(teacher || student)``
                over each query's own ``P + N`` candidates, from the teacher scores in the batch's labels (see "Teacher
                terms" below).
            student_temperature: Temperature ``s`` of the student's softmax over its cosine similarities (default:
                ``temperature``). The term is multiplied by ``s**2``, as in
                :class:`~sentence_transformers.sentence_transformer.losses.DistillKLDivLoss`.
            teacher_temperature: Temperature ``t`` of the teacher's softmax over its scores (default 1.0: scores
                used as logits, e.g. a cross-encoder's).
            guide: A :class:`~sentence_transformers.SentenceTransformer` whose similarities decide which in-batch and
                hard candidates are false negatives (GISTEmbed). It is run without gradients, in the chunks the model
                is embedded in (length-sorted with ``sort_by_length``), on texts re-tokenized with its own tokenizer
                when its vocabulary differs or it truncates shorter than the model (as
                :class:`~sentence_transformers.sentence_transformer.losses.CachedGISTEmbedLoss` does). Its embedding
                size may differ from the model's. Put it in eval mode (as loaded); it is not trained.
            margin_strategy: ``"absolute"`` (masked when the guide similarity ``> pos - margin``) or ``"relative"``
                (``> pos - |pos| * margin``), ``pos`` the guide similarity of the query to its lowest positive.
            margin: The margin of ``margin_strategy`` (default 0.0: mask every candidate the guide ranks above the
                query's lowest positive).

        Directions with several positives:
            For each positive slot ``k`` the loss is sentence-transformers'
            :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` with the same
            ``directions``/``partition_mode``/``hardness_*`` on the columns (anchor, positive_k, negative_1..N),
            averaged over slots (and, as always here, over queries). Slot ``k``'s documents are every row's k-th
            positive and every hard negative, so a query's other positives (k' != k) never enter any of its
            directions: ``query_to_doc`` has the query against every k-th positive and hard negative,
            ``doc_to_query`` the query's k-th positive against every query (its own is the target),
            ``doc_to_doc`` that positive against the other rows' k-th positives and hard negatives, and
            ``query_to_query`` the query against the other queries. With ``mask_duplicates`` the same input rule holds
            in every direction: a candidate document identical to one of the query's positives, or a candidate
            query identical to the query, is removed (never the row's own target). With
            ``gather_across_devices=True`` the queries are gathered too when ``query_to_query`` or ``doc_to_query``
            is on.

        Teacher terms:
            **Distillation** (``distillation_weight > 0``): the batch's labels are teacher scores, a float tensor
            ``(batch, P + N)`` aligned with the columns ``positive_1..P, negative_1..N`` (a dataset column ``label``
            holding a list of ``P + N`` floats per row, in that order; sentence-transformers hands it to the loss as
            a 2-D tensor). The added term is listwise, over each query's own ``P + N`` candidates (no in-batch
            candidates, no masking)::

                weight * s**2 * 1/B Σ_i KL( softmax(t_i / t) || softmax(cos(q_i, c_i) / s) )

            with ``c_i`` the row's positives and hard negatives. For ``num_positives=1`` this is ``weight *
            DistillKLDivLoss(model, similarity_fct=pairwise_cos_sim, student_temperature=s, teacher_temperature=t)``;
            for ``P > 1`` the teacher orders the positives among themselves too (a softmax over all ``P + N``).
            Without distillation the labels are ignored (an IR dataset may carry its scores unused).

            **Guide masking** (``guide``): for each query, every in-batch or hard candidate whose guide similarity
            to the query exceeds the guide similarity of the query to its lowest positive minus the margin is
            removed from its softmax; its own positives never are. The other directions use the same bar with the
            guide similarity of their own anchor (the query for ``query_to_query``, the positive for the document
            directions). For ``num_positives=1``, ``directions=("query_to_doc",)`` this equals
            ``CachedGISTEmbedLoss(model, guide, temperature, contrast_anchors=False, contrast_positives=False)``, and
            adding ``"query_to_query"`` equals ``contrast_anchors=True``.

        Length-aware embedding:
            A column is padded to its longest text, so on short, uneven texts most of what the encoder computes is
            padding. With ``sort_by_length=True`` each column's rows are sorted by real (attention-mask) length,
            shortest first, before the column is cut into mini-batches (by ``mini_batch_size`` rows or packed into
            ``mini_batch_num_tokens`` tokens), and each mini-batch is embedded at the width of its own longest text.
            The last mini-batch of a column then holds its longest texts, so a kept graph saves the most work.
            In the single pass (below) a column that fits in one mini-batch is still embedded as several sorted
            chunks, with boundaries chosen to minimise the padded tokens (a chunk boundary must save more padding
            than the cost of a forward call); under DDP (whose forward calls must match across ranks) it stays one
            chunk. The embeddings are put back in the original order before scoring. Leading (left) padding of
            decoder embedders is trimmed only for models with rotary positions, with explicit ``position_ids`` that
            keep every token's position in the full-width column; other left-padded models keep it. The kept graphs
            and the replay work on the sorted mini-batches exactly as on unsorted ones (same RNG replay per
            mini-batch). Flattened (``cu_seq_lens_q``) and multimodal inputs are left unsorted.

        Passes:
            GradCache (like :class:`~sentence_transformers.sentence_transformer.losses.CachedMultipleNegativesRankingLoss`)
            embeds every mini-batch twice: once without gradients to compute the loss and the gradients w.r.t. the
            embeddings, once more with gradients in the backward pass. This loss skips the repeated work where it can:

            - **Single pass**: when every column of the step fits in one mini-batch (``mini_batch_size`` rows, or
              ``mini_batch_num_tokens`` tokens), or the whole step has at most ``keep_graphs`` mini-batches, every
              column is embedded once with gradients and ``loss.backward()`` goes straight through the model, like
              :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` (and with its
              memory).
            - **Kept graphs**: otherwise the last ``keep_graphs`` mini-batches keep their graph from the first pass
              and only the others are replayed.

            Both are exact: the first pass draws the same random numbers as the plain passes (so dropout masks are
            the ones the replay would reproduce), the loss is computed by the same chunked code, and the incoming
            gradient scales every mini-batch. With ``gather_across_devices=True`` the ranks agree on the path with
            one small ``all_reduce`` (token budgets can make one rank's batch fit and another's not). Under DDP a
            single pass synchronises once like an uncached loss, and kept graphs (under DDP taken from the last
            column only, so a replay of the same modules follows them) accumulate locally until the replay's last
            mini-batch synchronises. DDP with ``static_graph=True`` always uses the plain passes.

        References:
            - CoDiEmb: A Collaborative yet Distinct Framework for Unified Representation Learning in Information
              Retrieval and Semantic Textual Similarity: https://arxiv.org/abs/2508.11442
            - Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup (GradCache):
              https://arxiv.org/abs/2101.06983
            - GISTEmbed (guide masking): https://arxiv.org/abs/2402.16829
            - Towards General Text Embeddings with Multi-stage Contrastive Learning (GTE, ``directions``):
              https://arxiv.org/abs/2308.03281
            - LLaVE (hardness weighting): https://arxiv.org/abs/2503.04812

        Requirements:
            1. ``1 + num_positives + N`` text columns (``N >= 0``): anchor, ``num_positives`` positives, then
               ``N`` hard negatives. Records with fewer positives or negatives can be padded by resampling with
               :mod:`codiemb_st.data`.
            2. Large ``per_device_train_batch_size`` with a ``mini_batch_size`` that fits in memory.

        Inputs:
            +--------------------------------------------------------------------+------------------------------------+
            | Texts                                                              | Labels                             |
            +====================================================================+====================================+
            | (anchor, positive_1, ..., positive_P)                              | none                               |
            +--------------------------------------------------------------------+------------------------------------+
            | (anchor, positive_1, ..., positive_P, negative_1, ..., negative_N) | none (ignored if present)          |
            +--------------------------------------------------------------------+------------------------------------+
            | (anchor, positive_1, ..., positive_P, negative_1, ..., negative_N) | teacher scores ``(P + N,)`` per    |
            | with ``distillation_weight > 0``                                   | row, column order (``label`` list) |
            +--------------------------------------------------------------------+------------------------------------+

        Relations:
            - With ``num_positives=1`` and ``mask_duplicates=False``: equal (loss and gradients) to
              :class:`~sentence_transformers.sentence_transformer.losses.CachedMultipleNegativesRankingLoss` and
              :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` with
              ``scale=1/temperature``.
            - With ``num_positives=1`` and the same ``directions``/``partition_mode``/``hardness_mode``/
              ``hardness_strength``: equal to sentence-transformers 6.3's MultipleNegativesRankingLoss with them; with
              a ``guide``: to CachedGISTEmbedLoss (``contrast_anchors=False, contrast_positives=False``); the
              distillation term: to ``distillation_weight`` x DistillKLDivLoss (``pairwise_cos_sim``).
            - Pair it with :class:`codiemb_st.PearsonSpearmanLoss` on STS datasets and
              :class:`codiemb_st.RoundRobinTaskBatchSampler` so every step (and every GPU) sees one task.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

                from codiemb_st import MultiPositiveCachedInfoNCELoss

                model = SentenceTransformer("intfloat/multilingual-e5-small")
                train_dataset = Dataset.from_dict({
                    "anchor": ["how do plants make food?", "who wrote hamlet?"],
                    "positive_1": ["Photosynthesis turns light into chemical energy.", "Hamlet is by Shakespeare."],
                    "positive_2": ["Plants produce glucose from CO2 and water.", "Shakespeare wrote Hamlet c. 1600."],
                    "negative_1": ["Animals eat plants for energy.", "Hamlet is a village in England."],
                })
                loss = MultiPositiveCachedInfoNCELoss(model, num_positives=2, temperature=0.02, mini_batch_size=32)

                trainer = SentenceTransformerTrainer(model=model, train_dataset=train_dataset, loss=loss)
                trainer.train()

            With a teacher: scores for (positive_1, positive_2, negative_1) in a ``label`` column, and a guide model
            that masks in-batch false negatives::

                train_dataset = train_dataset.add_column("label", [[9.1, 7.4, 1.2], [8.8, 8.0, -2.5]])
                loss = MultiPositiveCachedInfoNCELoss(
                    model,
                    num_positives=2,
                    distillation_weight=1.0,
                    student_temperature=0.05,
                    teacher_temperature=1.0,
                    guide=SentenceTransformer("BAAI/bge-base-en-v1.5"),
                    margin=0.05,
                    directions=("query_to_doc", "query_to_query"),
                )
        """
        super().__init__()
        _input_checks.check_infonce_options(type(self).__name__, model, temperature)
        validation.check_positive_int("num_positives", num_positives)
        validation.check_positive_float("temperature", temperature)  # the official CoDiEmb value is 0.02
        validation.check_positive_int("mini_batch_size", mini_batch_size)
        if mini_batch_num_tokens is not None:
            validation.check_positive_int("mini_batch_num_tokens", mini_batch_num_tokens)
        validation.check_choice("objective", objective, ("per_slot", "joint"))
        validation.check_non_negative_int("keep_graphs", keep_graphs)  # 0 = plain two-pass GradCache
        validation.check_bool("sort_by_length", sort_by_length)
        validation.check_bool("in_batch_negatives", in_batch_negatives)
        self.directions = _teacher_terms.check_direction_options(
            type(self).__name__,
            directions,
            partition_mode,
            hardness_mode,
            hardness_strength,
            objective,
            in_batch_negatives,
        )
        if hardness_mode is not None and hardness_strength == 0:
            logger.warning(
                "hardness_mode=%r is set but hardness_strength=0.0, so hardness weighting has no effect. Set "
                "hardness_strength to a positive value (LLaVE uses 9, EmbeddingGemma 5).",
                hardness_mode,
            )
        _teacher_terms.check_distillation_options(
            type(self).__name__, distillation_weight, student_temperature, teacher_temperature
        )
        validation.check_choice("margin_strategy", margin_strategy, _teacher_terms.MARGIN_STRATEGIES)
        validation.check_finite_float("margin", margin)
        # Re-tokenize for the guide as CachedGISTEmbedLoss does (vocabularies differ, or the guide truncates shorter).
        self.guide_retokenizes = (
            False if guide is None else _teacher_terms.check_guide(type(self).__name__, model, guide)
        )
        if has_static_embedding_input(model):
            raise ValueError(
                "MultiPositiveCachedInfoNCELoss cannot split the inputs of a StaticEmbedding model into mini-batches. "
                "Use a transformer-based SentenceTransformer."
            )
        self.model = model
        self.num_positives = num_positives
        self.temperature = float(temperature)
        self.mini_batch_size = mini_batch_size
        self.mini_batch_num_tokens = mini_batch_num_tokens
        self.gather_across_devices = gather_across_devices
        self.objective = objective
        self.mask_duplicates = mask_duplicates
        self.show_progress_bar = show_progress_bar
        self.keep_graphs = keep_graphs
        self.sort_by_length = sort_by_length
        self.in_batch_negatives = in_batch_negatives
        self.partition_mode = partition_mode
        self.hardness_mode = hardness_mode
        self.hardness_strength = float(hardness_strength)
        self.distillation_weight = float(distillation_weight)
        self.student_temperature = self.temperature if student_temperature is None else float(student_temperature)
        self.teacher_temperature = float(teacher_temperature)
        self.guide = guide
        # The model's tokenizer decodes its inputs for the guide; taken now, since under DDP the trainer may hand the
        # loss a wrapped model later.
        self.guide_retokenize_with = model.tokenizer if self.guide_retokenizes else None
        self.margin_strategy = margin_strategy
        self.margin = float(margin)

    @property
    def scale(self) -> float:
        """``1 / temperature``, the name sentence-transformers' ranking losses use."""
        return 1.0 / self.temperature

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        sentence_features = list(sentence_features)
        if (zero := _input_checks.ir_batch_fallback(self, sentence_features)) is not None:
            return zero
        self._check_num_columns(len(sentence_features))
        if torch.is_grad_enabled():  # DeepSpeed ZeRO-2/3 cannot take GradCache's per-mini-batch gradients
            check_gradient_caching_supported(type(self).__name__)
        # The text identities (and the teacher scores and guide embeddings when those terms are on) travel to
        # calculate_loss as its "labels": no state is kept on self between the forward pass and the GradCache backward
        # pass. The dataset's own labels are only read for distillation; otherwise a `label` column is ignored.
        text_ids = hash_columns(sentence_features) if self.mask_duplicates else None
        if self.distillation_weight == 0 and self.guide is None:
            return self.forward_cached(sentence_features, text_ids)
        teacher_scores = self._checked_teacher_scores(labels, sentence_features) if self.distillation_weight else None
        guide_embeddings = self._embed_with_guide(sentence_features) if self.guide is not None else None
        targets = _teacher_terms.LossTargets(text_ids, teacher_scores, guide_embeddings)
        return self.forward_cached(sentence_features, targets)

    def _checked_teacher_scores(self, labels: Tensor | None, columns: Sequence[Any]) -> Tensor:
        num_candidates = len(columns) - 1
        if num_candidates < 2:
            raise ValueError(
                f"{type(self).__name__}(distillation_weight > 0) needs at least 2 candidate columns (positives plus "
                f"hard negatives), but the batch has {num_candidates}: a softmax over one candidate is constant, so "
                "the distillation term would be 0. Add hard-negative columns or set distillation_weight=0."
            )
        batch_size = _input_checks.num_rows(columns[0])
        return _teacher_terms.check_teacher_scores(
            type(self).__name__, labels, batch_size, num_candidates, self.num_positives
        )

    def _embed_with_guide(self, sentence_features: list[dict[str, Tensor]]) -> tuple[Tensor, ...]:
        """The guide's embeddings of every column (original row order), without gradients, in the chunks the model
        is embedded in: GradCache mini-batches, cut from the length-sorted column with ``sort_by_length`` (and the
        single pass's padding chunks). Flattened or multimodal columns go to the guide whole."""
        retokenize_with = self.guide_retokenize_with
        device = next(v.device for v in sentence_features[0].values() if isinstance(v, Tensor))
        embeddings = []
        for feature in sentence_features:
            order = None
            if length_order.real_lengths(feature) is None:  # not a plain padded column: one call
                ranges, chunk = [(0, _input_checks.num_rows(feature))], _whole_column
            else:
                if self.sort_by_length:
                    feature, order = length_order.sort_by_length(feature)
                ranges = minibatch_ranges(feature, self.mini_batch_size, self.mini_batch_num_tokens)
                if self.sort_by_length and len(ranges) == 1:  # the single pass's padding chunks
                    ranges = self._padding_chunks(feature, ranges)
                chunk = _trimmed_rows
            embedded = _teacher_terms.embed_with_guide(self.guide, feature, ranges, chunk, retokenize_with, device)
            embeddings.append(length_order.restore_order(embedded, order))
        _teacher_terms.check_guide_embeddings(
            type(self).__name__, embeddings, len(sentence_features), embeddings[0].shape[0]
        )
        return tuple(embeddings)

    def forward_cached(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """GradCache forward that skips the work the plain two passes would repeat (see "Passes" in ``__init__``).

        Falls back to :meth:`CachedLossMixin.forward_cached` without gradients (nothing to cache), with
        ``keep_graphs=0`` and under static-graph DDP (whose reducer expects the same backward calls every step).
        With ``sort_by_length`` every column is sorted by length first (and ``labels`` travels wrapped with the sort
        orders to :meth:`calculate_loss`, which restores the original order).
        """
        sentence_features = list(sentence_features)
        if self.sort_by_length:
            sentence_features, labels = length_order.sort_columns(sentence_features, labels)
        model = getattr(self.model, "_orig_mod", self.model)
        static_graph_ddp = isinstance(model, DistributedDataParallel) and model.static_graph
        if not torch.is_grad_enabled() or self.keep_graphs == 0 or static_graph_ddp:
            return super().forward_cached(sentence_features, labels)
        # The mini-batch boundaries of the plain passes, computed before any forward pass (modules may edit the
        # features in place while embedding; the replay must use these same boundaries).
        ranges = [
            minibatch_ranges(feature, self.mini_batch_size, self.mini_batch_num_tokens)
            for feature in sentence_features
        ]
        ddp = isinstance(model, DistributedDataParallel)
        num_kept = self._num_kept_graphs(ranges, sentence_features, ddp)
        single_pass = num_kept == sum(len(column_ranges) for column_ranges in ranges)
        if (
            self.sort_by_length
            and single_pass
            and not ddp
            and all(len(column_ranges) == 1 for column_ranges in ranges)
        ):
            # Single pass over columns that fit in one mini-batch: embed them as several length-sorted chunks.
            # (Under DDP every forward call may synchronise buffers, so the ranks' numbers of calls must match.)
            ranges = [
                self._padding_chunks(feature, column_ranges)
                for feature, column_ranges in zip(sentence_features, ranges)
            ]
            num_kept = sum(len(column_ranges) for column_ranges in ranges)
        return self._forward_keeping_graphs(sentence_features, labels, ranges, num_kept, model)

    def _padding_chunks(
        self, feature: dict[str, Tensor], column_ranges: list[tuple[int, int]]
    ) -> list[tuple[int, int]]:
        """Length-sorted chunks of a column that fits in one mini-batch (the one range it has otherwise)."""
        chunks = length_order.column_chunks(feature)
        return column_ranges if chunks is None else chunks

    def embed_minibatch(
        self,
        sentence_feature: dict[str, Tensor],
        begin: int,
        end: int,
        with_grad: bool,
        copy_random_state: bool,
        random_state: Any = None,
    ) -> tuple[Tensor, Any]:
        """Embed rows ``begin:end``; with ``sort_by_length`` trimmed to the chunk's own padding (also leading padding
        where positions can be kept, see "Length-aware embedding" in ``__init__``)."""
        if self.sort_by_length and length_order.real_lengths(sentence_feature) is not None:
            keep_positions = length_order.keeps_positions_with_position_ids(self.model)
            sentence_feature = length_order.chunk_feature(sentence_feature, begin, end, keep_positions)
            begin, end = 0, end - begin
        return super().embed_minibatch(sentence_feature, begin, end, with_grad, copy_random_state, random_state)

    def calculate_loss(
        self,
        reps: list[list[Tensor]],
        labels: Tensor | _teacher_terms.LossTargets | None = None,
        *,
        with_backward: bool = False,
    ) -> Tensor:
        """GradCache hook: the loss from per-mini-batch embeddings; ``labels`` are the text identities, or (with
        distillation or a guide) a ``LossTargets`` holding them with the teacher scores and the guide embeddings.

        With length-sorted columns ``labels`` is a ``SortedColumns`` holding those and the columns' sort orders; the
        embeddings are put back in the original row order before scoring.
        """
        columns = [torch.cat(column) for column in reps]
        if isinstance(labels, length_order.SortedColumns):
            columns, labels = labels.restore(columns), labels.labels
        return self._loss(columns, labels, with_backward=with_backward)

    def compute_loss_from_embeddings(
        self,
        embeddings: list[Tensor],
        text_ids: Tensor | None = None,
        *,
        labels: Tensor | None = None,
        guide_embeddings: Sequence[Tensor] | None = None,
    ) -> Tensor:
        """Compute the loss from already computed embeddings (no gradient caching).

        Args:
            embeddings: One ``(batch, dim)`` tensor per column: anchor, positives, then hard negatives.
            text_ids: Optional ``(batch, num_columns)`` int64 identities of the inputs (equal for equal texts),
                used for duplicate masking; see :func:`codiemb_st.losses.text_identity.hash_columns`.
            labels: Teacher scores ``(batch, P + N)``; needed with ``distillation_weight > 0``, else ignored.
            guide_embeddings: The guide's ``(batch, guide_dim)`` embeddings of every column; needed with a
                ``guide``, else ignored.

        Returns:
            The scalar loss, differentiable w.r.t. ``embeddings``.
        """
        if (zero := _input_checks.ir_batch_fallback(self, embeddings)) is not None:
            return zero
        self._check_num_columns(len(embeddings))
        if not self.mask_duplicates:
            text_ids = None
        teacher_scores = self._checked_teacher_scores(labels, embeddings) if self.distillation_weight else None
        if self.guide is None:
            guide_embeddings = None
        else:
            _teacher_terms.check_guide_embeddings(
                type(self).__name__, guide_embeddings, len(embeddings), embeddings[0].shape[0]
            )
            guide_embeddings = tuple(guide_embeddings)
        targets = _teacher_terms.LossTargets(text_ids, teacher_scores, guide_embeddings)
        return self._loss(list(embeddings), targets, with_backward=False)

    def check_column_names(self, column_names: Sequence[str]) -> None:
        """Refuse dataset columns that do not fit ``num_positives`` (a batch carries no column names).

        :class:`codiemb_st.LossColumnCheck` calls it before the first training step (``codiemb-st train`` adds it);
        see :func:`codiemb_st.losses.column_check.check_ir_columns` for the rule.

        Raises:
            ValueError: Naming the columns and ``num_positives``.
        """
        check_ir_columns(column_names, self.num_positives)

    def _check_num_columns(self, num_columns: int) -> None:
        if num_columns < 1 + self.num_positives:
            raise ValueError(
                f"MultiPositiveCachedInfoNCELoss(num_positives={self.num_positives}) needs at least "
                f"{1 + self.num_positives} text columns (anchor, positive_1..positive_{self.num_positives}, then "
                f"optional hard negatives), but the batch has {num_columns}. Set num_positives to the number of "
                "positive columns in your dataset, or pad records with codiemb_st.data."
            )
        if not self.in_batch_negatives and num_columns == 1 + self.num_positives:
            raise ValueError(
                "MultiPositiveCachedInfoNCELoss(in_batch_negatives=False) needs hard-negative columns: without "
                "in-batch negatives and without hard negatives a query has nothing to be ranked against."
            )

    def _gather(self, candidates: Tensor, text_ids: Tensor | None) -> tuple[Tensor, Tensor | None, int]:
        """Gather ``(batch, columns, dim)`` candidates (with gradient) and their identities from every rank.

        Returns the global candidates, the global identities and the offset of this rank's rows in them.
        """
        if not self.gather_across_devices:
            return candidates, text_ids, 0
        if not is_dist_initialized() or get_world_size() == 1:
            if not getattr(self, "_warned_not_distributed", False):
                logger.warning(
                    "gather_across_devices=True but torch.distributed is not initialized (or has one process): "
                    "using the local batch only."
                )
                self._warned_not_distributed = True
            return candidates, text_ids, 0
        # all_gather needs identical shapes on every rank; check first so that a mismatch raises the same error on
        # every rank instead of hanging or failing deep inside the collective.
        shape = torch.tensor(candidates.shape, device=candidates.device)
        shapes = all_gather(shape[None]).tolist()
        if any(other != shapes[0] for other in shapes):
            raise ValueError(
                "gather_across_devices=True needs the same (batch size, number of columns, embedding dim) on every "
                f"rank, got {[tuple(s) for s in shapes]} per rank. Set dataloader_drop_last=True so every "
                "per-device batch is full, and give every rank the same dataset at every step (e.g. with "
                "codiemb_st.RoundRobinTaskBatchSampler)."
            )
        global_candidates = all_gather_with_grad(candidates)
        global_ids = all_gather(text_ids) if text_ids is not None else None
        return global_candidates, global_ids, get_rank() * candidates.shape[0]

    def _gathering(self) -> bool:
        return self.gather_across_devices and is_dist_initialized() and get_world_size() > 1

    def _loss(
        self, embeddings: list[Tensor], labels: Tensor | _teacher_terms.LossTargets | None, *, with_backward: bool
    ) -> Tensor:
        targets = _teacher_terms.as_targets(labels)
        text_ids = targets.text_ids
        num_pos = self.num_positives
        queries = embeddings[0]
        batch_size = queries.shape[0]
        candidates = torch.stack(embeddings[1:], dim=1)  # (batch, P + N, dim)
        candidates, global_ids, offset = self._gather(candidates, text_ids)
        # query_to_query and doc_to_query score against every query of the (global) batch.
        extra_directions = [direction for direction in self.directions if direction != "query_to_doc"]
        global_queries = None
        if {"query_to_query", "doc_to_query"} & set(extra_directions):
            global_queries = all_gather_with_grad(queries) if self._gathering() else queries

        # Normalise once (cosine similarity). With backward, score against detached leaves chunk by chunk and
        # send their accumulated gradients through the normalisation (and the gather) once at the end.
        queries_n = F.normalize(queries if global_queries is None else global_queries, p=2, dim=-1)
        candidates_n = F.normalize(candidates, p=2, dim=-1)
        if with_backward:
            query_leaf = queries_n.detach().requires_grad_()
            candidate_leaf = candidates_n.detach().requires_grad_()
        else:
            query_leaf, candidate_leaf = queries_n, candidates_n
        # This rank's queries (a view of the global ones when those are needed: their gradients add up there).
        local_query_leaf = query_leaf if global_queries is None else query_leaf[offset : offset + batch_size]

        num_global, num_columns, dim = candidate_leaf.shape
        flat_candidates = candidate_leaf.reshape(num_global * num_columns, dim)
        own_positive_ids = text_ids[:, 1 : 1 + num_pos] if text_ids is not None else None
        candidate_ids = global_ids[:, 1:] if global_ids is not None else None
        guide = self._guide_similarity_inputs(targets.guide_embeddings, global_queries is not None)
        hardness = self.hardness_mode is not None and self.hardness_strength > 0

        total = queries.new_zeros(())
        for begin in tqdm.trange(
            0, batch_size, self.mini_batch_size, desc="Calculating loss", disable=not self.show_progress_bar
        ):
            end = min(begin + self.mini_batch_size, batch_size)
            rows = torch.arange(begin, end, device=queries.device)
            cosines = (local_query_leaf[begin:end] @ flat_candidates.T).view(end - begin, num_global, num_columns)
            scores = cosines * self.scale
            own = rows + offset  # global index of each row's own candidates
            if own_positive_ids is not None:
                # (rows, global, columns): the candidate's input equals one of the row's own positives.
                duplicate = (candidate_ids[None, :, :, None] == own_positive_ids[begin:end, None, None, :]).any(-1)
                duplicate[torch.arange(end - begin), own, :num_pos] = False  # own positives are not false negatives
                scores = scores.masked_fill(duplicate, float("-inf"))
            if not self.in_batch_negatives:  # only the row's own candidates stay in its softmax
                others = torch.ones(end - begin, num_global, 1, dtype=torch.bool, device=scores.device)
                others[torch.arange(end - begin), own] = False
                scores = scores.masked_fill(others, float("-inf"))
            guide_rows = None
            if guide is not None:
                guide_rows = self._guide_rows(guide, begin, end, own)
                scores = scores.masked_fill(guide_rows["query_to_doc"], float("-inf"))
            if hardness:  # sentence-transformers' order: scaled cosine + alpha * stop_grad(cosine)
                scores = scores + _teacher_terms.hardness_penalty(
                    cosines, own, num_pos, self.hardness_mode, self.hardness_strength
                )
            if extra_directions:
                row_loss = self._directions_chunk_loss(
                    scores,
                    own,
                    local_query_leaf[begin:end],
                    query_leaf,
                    candidate_leaf[own, :num_pos],
                    flat_candidates,
                    text_ids[begin:end] if text_ids is not None else None,
                    global_ids,
                    guide_rows,
                )
            else:
                row_loss = self._chunk_loss(scores, own)
            chunk_loss = row_loss.sum() / batch_size
            if self.distillation_weight:
                # Each row's own P + N candidates only (no in-batch candidates, no masks), as DistillKLDivLoss.
                distillation = _teacher_terms.distillation_kl(
                    cosines[torch.arange(end - begin), own],
                    targets.teacher_scores[begin:end],
                    self.student_temperature,
                    self.teacher_temperature,
                )
                chunk_loss = chunk_loss + self.distillation_weight * distillation / batch_size
            if with_backward:
                chunk_loss.backward()
                chunk_loss = chunk_loss.detach()
            total = total + chunk_loss

        if with_backward:
            torch.autograd.backward([queries_n, candidates_n], [query_leaf.grad, candidate_leaf.grad])
            return total.detach()
        return total

    def _guide_similarity_inputs(
        self, guide_embeddings: tuple[Tensor, ...] | None, global_queries: bool
    ) -> dict[str, Tensor] | None:
        """The guide's normalised embeddings: local queries, global candidates (and global queries when needed)."""
        if guide_embeddings is None:
            return None
        with torch.no_grad():
            columns = [F.normalize(column.float(), p=2, dim=-1) for column in guide_embeddings]
            candidates = torch.stack(columns[1:], dim=1)
            queries = columns[0]
            if self._gathering():
                candidates = all_gather(candidates)
                if global_queries:
                    queries = all_gather(queries)
        return {"local_queries": columns[0], "queries": queries, "candidates": candidates}

    def _guide_rows(self, guide: dict[str, Tensor], begin: int, end: int, own: Tensor) -> dict[str, Tensor]:
        """Guide masks of rows ``begin:end`` for every direction: True where the candidate is masked.

        A candidate is masked when its guide similarity (to the row's query, or to the row's positive for the
        document directions) exceeds the guide similarity of the query to its lowest positive minus the margin
        (CachedGISTEmbedLoss's rule); the row's own positives (and, for ``doc_to_query``, its own query) never.
        """
        num_pos = self.num_positives
        rows = torch.arange(end - begin, device=own.device)
        candidates = guide["candidates"]  # (global, P + N, guide_dim)
        num_global, num_columns, _ = candidates.shape
        flat = candidates.reshape(num_global * num_columns, -1)
        with torch.no_grad():
            query_doc = (guide["local_queries"][begin:end] @ flat.T).view(end - begin, num_global, num_columns)
            threshold = query_doc[rows, own, :num_pos].amin(dim=-1)
            masks = {"query_to_doc": self._guide_mask(query_doc, threshold)}
            masks["query_to_doc"][rows, own, :num_pos] = False
            own_positives = candidates[own, :num_pos]  # (rows, P, guide_dim)
            if "query_to_query" in self.directions:
                masks["query_to_query"] = self._guide_mask(
                    guide["local_queries"][begin:end] @ guide["queries"].T, threshold
                )
            if "doc_to_query" in self.directions:
                doc_query = own_positives @ guide["queries"].T  # (rows, P, global)
                masks["doc_to_query"] = self._guide_mask(doc_query, threshold)
                masks["doc_to_query"][rows, :, own] = False
            if "doc_to_doc" in self.directions:
                doc_doc = (own_positives @ flat.T).view(end - begin, num_pos, num_global, num_columns)
                masks["doc_to_doc"] = self._guide_mask(doc_doc, threshold)
        return masks

    def _guide_mask(self, similarities: Tensor, threshold: Tensor) -> Tensor:
        return _teacher_terms.guide_mask(similarities, threshold, self.margin_strategy, self.margin)

    def _directions_chunk_loss(
        self,
        scores: Tensor,
        own: Tensor,
        queries: Tensor,
        global_queries: Tensor,
        own_positives: Tensor,
        flat_candidates: Tensor,
        own_ids: Tensor | None,
        global_ids: Tensor | None,
        guide_masks: dict[str, Tensor] | None,
    ) -> Tensor:
        """Per-row loss with extra ``directions``: for each positive slot k, sentence-transformers'
        MultipleNegativesRankingLoss with these directions on (anchor, positive_k, negatives), averaged over slots.

        Args:
            scores: ``(rows, global, P + N)`` scaled query-to-document logits, masks and hardness applied.
            own: ``(rows,)`` global index of each row.
            queries: ``(rows, dim)`` the rows' normalised queries.
            global_queries: ``(global, dim)`` every normalised query.
            own_positives: ``(rows, P, dim)`` the rows' normalised positives.
            flat_candidates: ``(global * (P + N), dim)`` every normalised candidate.
            own_ids: ``(rows, columns)`` the rows' text identities (duplicate masking), or None.
            global_ids: ``(global, columns)`` every text identity, or None.
            guide_masks: The guide masks of :meth:`_guide_rows`, or None.
        """
        num_pos = self.num_positives
        num_rows, num_global, num_columns = scores.shape
        rows = torch.arange(num_rows, device=scores.device)
        inf = float("-inf")
        per_slot = {
            "query_to_doc": [
                torch.cat([scores[:, :, k], scores[:, :, num_pos:].flatten(1)], 1) for k in range(num_pos)
            ]
        }
        if "query_to_query" in self.directions:
            query_query = (queries @ global_queries.T) * self.scale  # (rows, global)
            mask = torch.zeros_like(query_query, dtype=torch.bool)
            if own_ids is not None:  # another copy of the row's query is not a negative
                mask = global_ids[None, :, 0] == own_ids[:, None, 0]
            if guide_masks is not None:
                mask = mask | guide_masks["query_to_query"]
            mask[rows, own] = True  # never the query itself
            per_slot["query_to_query"] = [query_query.masked_fill(mask, inf)] * num_pos
        if "doc_to_query" in self.directions:
            doc_query = (own_positives @ global_queries.T) * self.scale  # (rows, P, global)
            mask = torch.zeros_like(doc_query, dtype=torch.bool)
            if own_ids is not None:  # another copy of the row's query is not a negative of its positive
                mask = (global_ids[None, :, 0] == own_ids[:, None, 0])[:, None, :].expand_as(doc_query).clone()
            if guide_masks is not None:
                mask = mask | guide_masks["doc_to_query"]
            mask[rows, :, own] = False  # the row's own query is the target
            doc_query = doc_query.masked_fill(mask, inf)
            per_slot["doc_to_query"] = [doc_query[:, k] for k in range(num_pos)]
        if "doc_to_doc" in self.directions:
            doc_doc = (own_positives @ flat_candidates.T).view(num_rows, num_pos, num_global, num_columns)
            doc_doc = doc_doc * self.scale
            mask = torch.zeros_like(doc_doc, dtype=torch.bool)
            if own_ids is not None:  # a copy of one of the row's positives is not a negative
                own_positive_ids = own_ids[:, 1 : 1 + num_pos]
                candidate_ids = global_ids[:, 1:]
                same = (candidate_ids[None, :, :, None] == own_positive_ids[:, None, None, :]).any(-1)
                mask = same[:, None].expand_as(doc_doc).clone()
            if guide_masks is not None:
                mask = mask | guide_masks["doc_to_doc"]
            mask[rows, :, own] = True  # the row's own documents (sentence-transformers' rule)
            doc_doc = doc_doc.masked_fill(mask, inf)
            # Slot k's documents: every k-th positive and every hard negative.
            per_slot["doc_to_doc"] = [
                torch.cat([doc_doc[:, k, :, k], doc_doc[:, k, :, num_pos:].flatten(1)], 1) for k in range(num_pos)
            ]
        losses = []
        for k in range(num_pos):
            logits = [per_slot[direction][k] for direction in self.directions]
            if self.partition_mode == "joint":
                log_z = torch.logsumexp(torch.cat(logits, dim=1), dim=1)
            else:
                log_z = torch.stack([torch.logsumexp(part, dim=1) for part in logits]).mean(0)
            losses.append(log_z - scores[rows, own, k])
        return torch.stack(losses, dim=1).mean(dim=1)

    def _chunk_loss(self, scores: Tensor, own: Tensor) -> Tensor:
        """Per-row loss from scaled scores ``(rows, global_batch, P + N)``; ``own`` is each row's global index."""
        num_pos = self.num_positives
        rows = torch.arange(scores.shape[0], device=scores.device)
        own_scores = scores[rows, own]  # (rows, P + N)
        negatives = scores[:, :, num_pos:].flatten(1)  # every hard negative of every query
        if self.objective == "joint":
            log_denominator = torch.logsumexp(scores.flatten(1), dim=1)
            log_numerator = torch.logsumexp(own_scores[:, :num_pos], dim=1)
            return log_denominator - log_numerator
        # per_slot: softmax over every query's k-th positive plus every hard negative, mean over slots.
        log_denominator = torch.logsumexp(scores[:, :, :num_pos], dim=1)  # (rows, P)
        if negatives.shape[1] > 0:
            log_denominator = torch.logaddexp(log_denominator, torch.logsumexp(negatives, dim=1, keepdim=True))
        return (log_denominator - own_scores[:, :num_pos]).mean(dim=1)

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "num_positives": self.num_positives,
            "temperature": self.temperature,
            "mini_batch_size": self.mini_batch_size,
            "mini_batch_num_tokens": self.mini_batch_num_tokens,
            "gather_across_devices": self.gather_across_devices,
            "objective": self.objective,
            "mask_duplicates": self.mask_duplicates,
            "keep_graphs": self.keep_graphs,
            "sort_by_length": self.sort_by_length,
            "in_batch_negatives": self.in_batch_negatives,
        }
        # The teacher terms and sentence-transformers 6.x options appear only when set (as DistillKLDivLoss lists its
        # temperatures), so the configuration of a loss without them reads as before.
        if self.directions != ("query_to_doc",) or self.partition_mode != "joint" or self.hardness_mode is not None:
            config["directions"] = self.directions
            config["partition_mode"] = self.partition_mode
            config["hardness_mode"] = self.hardness_mode
            config["hardness_strength"] = self.hardness_strength
        if self.distillation_weight:
            config["distillation_weight"] = self.distillation_weight
            config["student_temperature"] = self.student_temperature
            config["teacher_temperature"] = self.teacher_temperature
        if self.guide is not None:
            config["guide"] = self.guide
            config["margin_strategy"] = self.margin_strategy
            config["margin"] = self.margin
        return config

    @property
    def citation(self) -> str:
        return CODIEMB_CITATION
