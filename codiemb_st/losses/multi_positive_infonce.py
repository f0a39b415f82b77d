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
from codiemb_st.losses import _input_checks, _length_order
from codiemb_st.losses._autocast_replay import AutocastReplayMixin
from codiemb_st.losses._cached_gradients import KeptGraphsMixin
from codiemb_st.losses._sharding import check_gradient_caching_supported
from codiemb_st.losses._text_identity import hash_columns
from codiemb_st.losses.column_check import check_ir_columns

logger = logging.getLogger(__name__)


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

        Requirements:
            1. ``1 + num_positives + N`` text columns (``N >= 0``): anchor, ``num_positives`` positives, then
               ``N`` hard negatives. Records with fewer positives or negatives can be padded by resampling with
               :mod:`codiemb_st.data`.
            2. Large ``per_device_train_batch_size`` with a ``mini_batch_size`` that fits in memory.

        Inputs:
            +------------------------------------------------------------------+--------+
            | Texts                                                            | Labels |
            +==================================================================+========+
            | (anchor, positive_1, ..., positive_P)                            | none   |
            +------------------------------------------------------------------+--------+
            | (anchor, positive_1, ..., positive_P, negative_1, ..., negative_N) | none   |
            +------------------------------------------------------------------+--------+

        Relations:
            - With ``num_positives=1`` and ``mask_duplicates=False``: equal (loss and gradients) to
              :class:`~sentence_transformers.sentence_transformer.losses.CachedMultipleNegativesRankingLoss` and
              :class:`~sentence_transformers.sentence_transformer.losses.MultipleNegativesRankingLoss` with
              ``scale=1/temperature``.
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
        # The text identities travel to calculate_loss as its "labels": no state is kept on self between the
        # forward pass and the GradCache backward pass. IR datasets have no label column.
        text_ids = hash_columns(sentence_features) if self.mask_duplicates else None
        return self.forward_cached(sentence_features, text_ids)

    def forward_cached(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None) -> Tensor:
        """GradCache forward that skips the work the plain two passes would repeat (see "Passes" in ``__init__``).

        Falls back to :meth:`CachedLossMixin.forward_cached` without gradients (nothing to cache), with
        ``keep_graphs=0`` and under static-graph DDP (whose reducer expects the same backward calls every step).
        With ``sort_by_length`` every column is sorted by length first (and ``labels`` travels wrapped with the sort
        orders to :meth:`calculate_loss`, which restores the original order).
        """
        sentence_features = list(sentence_features)
        if self.sort_by_length:
            sentence_features, labels = _length_order.sort_columns(sentence_features, labels)
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
        chunks = _length_order.column_chunks(feature)
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
        if self.sort_by_length and _length_order.real_lengths(sentence_feature) is not None:
            keep_positions = _length_order.keeps_positions_with_position_ids(self.model)
            sentence_feature = _length_order.chunk_feature(sentence_feature, begin, end, keep_positions)
            begin, end = 0, end - begin
        return super().embed_minibatch(sentence_feature, begin, end, with_grad, copy_random_state, random_state)

    def calculate_loss(
        self, reps: list[list[Tensor]], labels: Tensor | None = None, *, with_backward: bool = False
    ) -> Tensor:
        """GradCache hook: the loss from per-mini-batch embeddings; ``labels`` are the text identities.

        With length-sorted columns ``labels`` is a ``SortedColumns`` holding the text identities and the columns' sort
        orders; the embeddings are put back in the original row order before scoring.
        """
        columns = [torch.cat(column) for column in reps]
        if isinstance(labels, _length_order.SortedColumns):
            columns, labels = labels.restore(columns), labels.labels
        return self._loss(columns, labels, with_backward=with_backward)

    def compute_loss_from_embeddings(self, embeddings: list[Tensor], text_ids: Tensor | None = None) -> Tensor:
        """Compute the loss from already computed embeddings (no gradient caching).

        Args:
            embeddings: One ``(batch, dim)`` tensor per column: anchor, positives, then hard negatives.
            text_ids: Optional ``(batch, num_columns)`` int64 identities of the inputs (equal for equal texts),
                used for duplicate masking; see :func:`codiemb_st.losses._text_identity.hash_columns`.

        Returns:
            The scalar loss, differentiable w.r.t. ``embeddings``.
        """
        if (zero := _input_checks.ir_batch_fallback(self, embeddings)) is not None:
            return zero
        self._check_num_columns(len(embeddings))
        if not self.mask_duplicates:
            text_ids = None
        return self._loss(list(embeddings), text_ids, with_backward=False)

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

    def _loss(self, embeddings: list[Tensor], text_ids: Tensor | None, *, with_backward: bool) -> Tensor:
        num_pos = self.num_positives
        queries = embeddings[0]
        batch_size = queries.shape[0]
        candidates = torch.stack(embeddings[1:], dim=1)  # (batch, P + N, dim)
        candidates, global_ids, offset = self._gather(candidates, text_ids)

        # Normalise once (cosine similarity). With backward, score against detached leaves chunk by chunk and
        # send their accumulated gradients through the normalisation (and the gather) once at the end.
        queries_n = F.normalize(queries, p=2, dim=-1)
        candidates_n = F.normalize(candidates, p=2, dim=-1)
        if with_backward:
            query_leaf = queries_n.detach().requires_grad_()
            candidate_leaf = candidates_n.detach().requires_grad_()
        else:
            query_leaf, candidate_leaf = queries_n, candidates_n

        num_global, num_columns, dim = candidate_leaf.shape
        flat_candidates = candidate_leaf.reshape(num_global * num_columns, dim)
        own_positive_ids = text_ids[:, 1 : 1 + num_pos] if text_ids is not None else None
        candidate_ids = global_ids[:, 1:] if global_ids is not None else None

        total = queries.new_zeros(())
        for begin in tqdm.trange(
            0, batch_size, self.mini_batch_size, desc="Calculating loss", disable=not self.show_progress_bar
        ):
            end = min(begin + self.mini_batch_size, batch_size)
            rows = torch.arange(begin, end, device=queries.device)
            scores = (query_leaf[begin:end] @ flat_candidates.T).view(end - begin, num_global, num_columns)
            scores = scores * self.scale
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
            chunk_loss = self._chunk_loss(scores, own).sum() / batch_size
            if with_backward:
                chunk_loss.backward()
                chunk_loss = chunk_loss.detach()
            total = total + chunk_loss

        if with_backward:
            torch.autograd.backward([queries_n, candidates_n], [query_leaf.grad, candidate_leaf.grad])
            return total.detach()
        return total

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
        return {
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

    @property
    def citation(self) -> str:
        return CODIEMB_CITATION
