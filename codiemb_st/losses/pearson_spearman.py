"""CoDiEmb's order-aware STS objective: Pearson + rank-KL + PRO on the cosine scores of a batch of pairs, plus an
auxiliary InfoNCE on the pooled middle transformer layer (MidNCE).

The terms are vectorised transcriptions of the released CoDiEmb training code
(``TencentCloudADP/youtu-embedding``, ``training/CoDiEmb/train/loss.py`` and ``model.py``), which ranks with scipy on
the CPU and runs PRO as a Python loop over the batch. Here every term stays on the batch's device as a few tensor ops.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from sentence_transformers import util
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from codiemb_st import validation
from codiemb_st._compat import (
    Pooling,
    SentenceTransformer,
    Transformer,
    all_gather_with_grad,
    embed_columns,
    is_adaptive_layer_loss_active,
)
from codiemb_st.citation import CODIEMB_CITATION
from codiemb_st.losses import _input_checks, length_order
from codiemb_st.losses.hidden_states import (  # noqa: F401 (re-exported: the cocktail merge imports them from here)
    FINAL_LAYER_KEYS,
    hidden_state_modules,
    hidden_states_requested,
    middle_layer_index,
)
from codiemb_st.losses.sts_terms import (  # noqa: F401 (re-exported: the old public import path)
    PRO_EPS,
    average_ranks,
    mid_nce_loss,
    pearson_loss,
    pro_loss,
    rank_kl_loss,
)

logger = logging.getLogger(__name__)


class PearsonSpearmanLoss(nn.Module):
    def __init__(
        self,
        model: SentenceTransformer,
        pearson_weight: float = 2.0,
        rank_kl_weight: float = 5.0,
        pro_weight: float = 0.5,
        temperature: float = 0.05,
        gather_across_devices: bool = False,
        return_dict: bool = False,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] = util.pairwise_cos_sim,
        mid_nce_weight: float = 1.0,
        mid_nce_temperature: float = 0.02,
        mid_nce_threshold: float = 1.0,
        mid_nce_layer: int | None = None,
        sort_by_length: bool = True,
    ) -> None:
        """
        CoDiEmb's order-aware loss for semantic textual similarity (STS). STS is judged by the Spearman correlation
        between predicted and gold similarities over all pairs, so instead of pushing each pair towards a target
        score, this loss scores the whole batch at once against the gold scores with three terms, computed on the
        cosine similarities ``s`` of the batch's pairs and their gold scores ``y``, plus CoDiEmb's auxiliary
        InfoNCE on a middle transformer layer:

        ``loss = pearson_weight * (1 - pearson(s, y)) + rank_kl_weight * RankKL + pro_weight * PRO
        + mid_nce_weight * MidNCE``

        - **Pearson**: ``1 - r`` with ``r`` the population Pearson correlation over the batch (Pcc-tuning).
        - **RankKL**: ``KL(P || Q)`` ("batchmean") between ``P = softmax(t / T)``, with ``t`` the gold ranks
          (descending, ties averaged) normalised to [0, 1], and ``Q = softmax(s / T)``.
        - **PRO**: a listwise loss: every pair must out-score all pairs with a lower gold score, the logits
          weighted by the label gaps (``w_j = y_k - y_j``, own weight ``max_j w_j``), divided by ``T``.
        - **MidNCE**: InfoNCE on the middle layer. The Transformer module's hidden states (a tuple that starts with
          the embedding output) are requested for this loss's own forward pass only; layer
          ``hidden_states[len(hidden_states) // 2]`` (or ``mid_nce_layer``) is pooled by the model's own Pooling
          module (same mode; prompt tokens it excludes stay excluded) and L2-normalised, giving ``a_i`` and ``b_i``
          for the two sentences. The anchors are the pairs with a raw gold score ``y_i >= mid_nce_threshold``; each
          anchor's positive is its own second sentence and its candidates are the second sentences of the whole
          batch: ``MidNCE = mean over anchors i of -log softmax_j(cos(a_i, b_j) / mid_nce_temperature)[i]``, 0 when
          the batch has no anchor. Modules after the Pooling module (Dense, Normalize) are not applied to it.

        The defaults are the weights and temperatures of the official CoDiEmb code, where the middle-layer term is on
        in every released training script (``--multi_layer_loss``, weight 1, ``--temperature 0.02``, threshold 1.0).
        Every term is vectorised on the batch's device (the official code ranks with scipy on the CPU and loops over
        the batch in Python). PRO
        compares every pair with every lower-labelled pair: on CPU its cost grows with batch size x number of
        distinct labels (near-linear for graded or binary labels), with all-distinct labels (e.g. distilled scores)
        it is quadratic; it runs in row chunks and keeps O(batch) memory for backward. The gold scores are checked
        once per batch for NaN/inf, which costs one device sync.

        Score range: the gold scores can be on any scale (0-1, 0-5, binary). The Pearson term is invariant to any
        increasing affine map of the gold scores and the RankKL term to any strictly increasing map; PRO uses the raw
        label gaps as logit weights, so rescaling the labels by ``c`` sharpens its softmax by ``c``.

        Degenerate batches: when all gold scores in a batch are equal (common with binary labels), the Pearson and
        PRO terms are undefined and contribute 0; RankKL is defined (uniform target) and pulls the predicted
        similarities together, as in the official code. Equal predicted similarities (a collapsed model) leave
        ``r`` undefined too: the Pearson term is then 1 without gradient (the official code gives NaN). A batch
        without MidNCE anchors gets 0 for that term (with a graph, never NaN). A batch with fewer than 2 pairs (e.g. a
        1-row last batch without ``dataloader_drop_last``) gives a loss of 0 and logs a warning. NaN or infinite gold
        scores raise a ``ValueError``.

        Middle-layer threshold: ``mid_nce_threshold`` is compared with the raw gold scores, as in the official code,
        so its meaning depends on the label scale. With 0-1 or binary labels the default 1.0 makes only the
        top-scored (positive) pairs anchors; with 0-5 labels (STS-B) or 0-2 (QBQTC) nearly every pair is an anchor
        (82% of the STSBenchmark test pairs score >= 1.0), so the term then also pulls weakly related pairs (1-2 of 5)
        together. Keep the official 1.0 to reproduce the paper, or set
        the threshold for your scale (e.g. 4.0 on 0-5 labels). Cost: the per-column forward passes keep every
        layer's hidden states until the loss is computed; they are saved for backward anyway, so the extra memory is
        small (see docs/results/measured-numbers.md).

        Args:
            model: SentenceTransformer model.
            pearson_weight: Weight of the Pearson term ``1 - r``.
            rank_kl_weight: Weight of the rank-KL term.
            pro_weight: Weight of the PRO term.
            temperature: Temperature ``T`` of the rank-KL softmaxes and of the PRO logits.
            gather_across_devices: If True, gather the similarities and gold scores of all ranks (with gradients)
                before computing the loss, so the correlation terms are over the global batch; the middle-layer
                embeddings are gathered too, so the MidNCE anchors and candidates are the global batch's. Every rank
                then computes the same global loss; with DDP's gradient averaging the parameter gradients equal
                those of one process on the global batch. Every rank must have the same per-device batch size (the default
                ``even_batches`` of accelerate, or ``dataloader_drop_last=True``). The official code computes the STS
                loss per device (no gathering), hence the default False.
            return_dict: If True, return the weighted terms as a dict (``pearson_loss``, ``rank_kl_loss``,
                ``pro_loss``, ``mid_nce_loss``, terms with weight 0 left out); ``SentenceTransformerTrainer`` sums
                them and logs each one. If False, return their sum.
            similarity_fct: Pairwise similarity between the two columns' embeddings. Default ``util.pairwise_cos_sim``
                (the method is defined on cosine similarity).
            mid_nce_weight: Weight of the middle-layer InfoNCE term. 0 switches it off: the loss is then the
                three-term loss exactly and no hidden states are requested. Needs a sentence-transformers Transformer
                module that returns hidden states, followed by a Pooling module.
            mid_nce_temperature: Temperature of the middle-layer InfoNCE (official 0.02).
            mid_nce_threshold: Pairs whose raw gold score is at least this are the InfoNCE anchors (official 1.0;
                see the threshold note above).
            mid_nce_layer: Index into the hidden-states tuple (0 = embedding output, ``len - 1`` = last layer;
                negative indices count from the end). Default None: ``len(hidden_states) // 2``, as in the official
                code.
            sort_by_length: If True (default), embed each column in length-sorted chunks (see "Length-aware
                embedding" below). The loss and its gradients do not depend on it (up to floating-point rounding); set
                it to False to embed each column in one forward pass in its own row order, as sentence-transformers'
                losses do.

        Length-aware embedding:
            A column is padded to its longest text, so on short, uneven STS pairs most of what the encoder computes
            is padding. With ``sort_by_length=True`` each column's rows are sorted by real (attention-mask) length,
            shortest first, and cut into chunks whose boundaries minimise the padded tokens (a boundary must save more
            padding than the cost of a forward call); each chunk is embedded with gradients at the width of its own
            longest text, and its middle layer (MidNCE) is pooled from the same forward pass. The embeddings are put
            back in the original order before scoring. Leading (left) padding of decoder embedders is trimmed only
            for models with rotary positions, with explicit ``position_ids`` that keep every token's position in the
            full-width column. A column that needs no sorting and fits one chunk is embedded exactly as with
            ``sort_by_length=False``, as are batches under DDP (whose forward calls must match across ranks), inside
            ``AdaptiveLayerLoss`` (which caches the per-column feature dicts) and flattened or multimodal inputs.

        References:
            - CoDiEmb: https://arxiv.org/abs/2508.11442 (official code: https://github.com/TencentCloudADP/youtu-embedding)
            - Pcc-tuning: Zhang & Li, 2024. Pcc-tuning: Breaking the Contrastive Learning Ceiling in Semantic Textual
              Similarity.
            - PRO: Peng et al., 2024. Large Language Model based Long-tail Query Rewriting in Taobao Search.

        Requirements:
            - Pairs of texts with a graded (or binary) gold similarity score, several distinct scores per batch.
            - For the middle-layer term (``mid_nce_weight > 0``): a Transformer module followed by a Pooling module,
              encoder or decoder backbone.

        Inputs:
            +--------------------------------+-------------------------------------------------------------+
            | Texts                          | Labels                                                      |
            +================================+=============================================================+
            | (sentence_A, sentence_B) pairs | float similarity score (raw scale: MidNCE anchors are pairs |
            |                                | scored ``>= mid_nce_threshold``)                            |
            +--------------------------------+-------------------------------------------------------------+

        Relations:
            - :class:`~sentence_transformers.sentence_transformer.losses.CoSENTLoss` also ranks pairs by their gold
              score (pairwise); this loss adds the correlation and listwise rank terms of CoDiEmb.

        Example:
            ::

                from datasets import Dataset
                from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer

                from codiemb_st import PearsonSpearmanLoss

                model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
                train_dataset = Dataset.from_dict({
                    "sentence1": ["It's nice weather outside today.", "He drove to work.", "A cat sleeps."],
                    "sentence2": ["It's so sunny.", "She walked to the store.", "The stock market fell."],
                    "score": [4.6, 1.2, 0.0],
                })
                loss = PearsonSpearmanLoss(model)

                trainer = SentenceTransformerTrainer(
                    model=model,
                    train_dataset=train_dataset,
                    loss=loss,
                )
                trainer.train()
        """
        super().__init__()
        weights = {
            "pearson_weight": pearson_weight,
            "rank_kl_weight": rank_kl_weight,
            "pro_weight": pro_weight,
            "mid_nce_weight": mid_nce_weight,
        }
        for name, weight in weights.items():
            validation.check_finite_float(name, weight, minimum=0.0)
        if not any(weight > 0 for weight in weights.values()):
            raise ValueError(
                "At least one of `pearson_weight`, `rank_kl_weight`, `pro_weight`, `mid_nce_weight` must be > 0; "
                "all are 0, so the loss would be constant."
            )
        validation.check_positive_float("temperature", temperature)
        validation.check_positive_float("mid_nce_temperature", mid_nce_temperature)
        validation.check_finite_float("mid_nce_threshold", mid_nce_threshold)
        if mid_nce_layer is not None:
            validation.check_int("mid_nce_layer", mid_nce_layer)
        validation.check_bool("gather_across_devices", gather_across_devices)
        validation.check_bool("sort_by_length", sort_by_length)
        if not isinstance(return_dict, bool):
            raise TypeError(f"`return_dict` must be a bool, got {type(return_dict).__name__}.")
        _input_checks.check_inverse_temperature(type(self).__name__, temperature)
        _input_checks.check_inverse_temperature(type(self).__name__, mid_nce_temperature, "mid_nce_temperature")
        if not callable(similarity_fct):
            raise TypeError(f"`similarity_fct` must be callable, got {type(similarity_fct).__name__}.")

        self.model = model
        self.pearson_weight = float(pearson_weight)
        self.rank_kl_weight = float(rank_kl_weight)
        self.pro_weight = float(pro_weight)
        self.temperature = float(temperature)
        self.gather_across_devices = gather_across_devices
        self.return_dict = return_dict
        self.similarity_fct = similarity_fct
        self.mid_nce_weight = float(mid_nce_weight)
        self.mid_nce_temperature = float(mid_nce_temperature)
        self.mid_nce_threshold = float(mid_nce_threshold)
        self.mid_nce_layer = mid_nce_layer
        self.sort_by_length = sort_by_length
        if model is not None and self.mid_nce_weight > 0:
            # Fail before training starts: the model can expose hidden states and the layer exists.
            transformer, _ = hidden_state_modules(model)
            num_layers = getattr(transformer.model.config, "num_hidden_layers", None)
            if isinstance(num_layers, int) and not isinstance(num_layers, bool):
                self._middle_layer_index(num_layers + 1)

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None
    ) -> Tensor | dict[str, Tensor]:
        sentence_features = list(sentence_features)
        if (zero := _input_checks.sts_batch_fallback(self, sentence_features, labels)) is not None:
            return zero
        if len(sentence_features) != 2:
            raise ValueError(
                f"{self.__class__.__name__} expects exactly 2 text columns (sentence1, sentence2) followed by a score "
                f"column, but got {len(sentence_features)} text columns. Remove or reorder the extra columns."
            )
        if self.mid_nce_weight == 0:
            # Exactly the three-term path: no hidden states requested.
            if self._sorts(sentence_features):
                embeddings = [self._embed_sorted(features)[0] for features in sentence_features]
            else:
                embeddings = embed_columns(self.model, sentence_features)
            return self.compute_loss_from_embeddings(embeddings, labels)
        embeddings, middle_embeddings = self.embed_with_middle_layer(sentence_features)
        return self.compute_loss_from_embeddings(embeddings, labels, middle_embeddings=middle_embeddings)

    def embed_with_middle_layer(self, sentence_features: list[dict[str, Tensor]]) -> tuple[list[Tensor], list[Tensor]]:
        """Embed each column, returning its final embeddings and its pooled middle-layer embeddings.

        One forward pass per column (as ``embed_columns`` does for two columns), with the hidden states requested for
        that pass only. The middle layer is pooled by the model's Pooling module with the column's own features
        (attention mask, ``prompt_length``), so it is pooled exactly like the final layer. As with the model's other
        outputs, the hidden states stay in the column's feature dict (``all_layer_embeddings``) until the batch is
        dropped; autograd keeps them for backward anyway.

        Args:
            sentence_features: One tokenized feature dict per column.

        Returns:
            ``(final, middle)``: per column, the (batch_size, dim) sentence embeddings and the unnormalised pooled
            middle-layer embeddings.
        """
        transformer, pooling = hidden_state_modules(self.model)
        if self._sorts(sentence_features):
            pairs = [self._embed_sorted(features, transformer, pooling) for features in sentence_features]
            return [final for final, _ in pairs], [middle for _, middle in pairs]
        final, middle = [], []
        for features in sentence_features:
            final_embeddings, middle_embeddings = self._embed_with_middle(features, transformer, pooling)
            final.append(final_embeddings)
            middle.append(middle_embeddings)
        return final, middle

    def _sorts(self, sentence_features: list[dict[str, Tensor]]) -> bool:
        """Whether this batch is embedded in length-sorted chunks (see "Length-aware embedding" in ``__init__``)."""
        if not self.sort_by_length:
            return False
        model = getattr(self.model, "_orig_mod", self.model)
        if isinstance(model, DistributedDataParallel) or is_adaptive_layer_loss_active(self.model):
            return False
        return all(length_order.real_lengths(features) is not None for features in sentence_features)

    def _embed_sorted(
        self, features: dict[str, Tensor], transformer: Transformer | None = None, pooling: Pooling | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """One column's final (and, given ``transformer`` and ``pooling``, middle-layer) embeddings, computed in
        length-sorted chunks and returned in the column's own row order."""
        sorted_features, order = length_order.sort_by_length(features)
        ranges = length_order.column_chunks(sorted_features)
        if order is None and len(ranges) == 1:  # nothing to gain: the plain call
            chunks = [features]
        else:
            keep_positions = length_order.keeps_positions_with_position_ids(self.model)
            chunks = [length_order.chunk_feature(sorted_features, begin, end, keep_positions) for begin, end in ranges]
        finals, middles = [], []
        for chunk in chunks:
            if transformer is None:
                finals.append(self.model(chunk)["sentence_embedding"])
            else:
                final, middle = self._embed_with_middle(chunk, transformer, pooling)
                finals.append(final)
                middles.append(middle)
        final = length_order.restore_order(torch.cat(finals), order)
        middle = length_order.restore_order(torch.cat(middles), order) if middles else None
        return final, middle

    def _embed_with_middle(
        self, features: dict[str, Tensor], transformer: Transformer, pooling: Pooling
    ) -> tuple[Tensor, Tensor]:
        """One forward pass with hidden states: the final embeddings and the pooled middle layer."""
        with hidden_states_requested(transformer):
            output = self.model(features)
        # Read, not popped: wrappers such as MatryoshkaLoss and AdaptiveLayerLoss cache this very dict and read
        # ``all_layer_embeddings`` from it again on their next call.
        hidden_states = output.get("all_layer_embeddings")
        if hidden_states is None:
            raise ValueError(
                f"`mid_nce_weight` > 0 needs hidden states, but the Transformer module "
                f"({type(transformer.model).__name__}) returned none with `output_hidden_states=True`. "
                "Set `mid_nce_weight=0` to train without the middle-layer InfoNCE term."
            )
        layer_features = {key: value for key, value in output.items() if key not in FINAL_LAYER_KEYS}
        layer_features["token_embeddings"] = hidden_states[self._middle_layer_index(len(hidden_states))]
        return output["sentence_embedding"], pooling(layer_features)["sentence_embedding"]

    def _middle_layer_index(self, num_hidden_states: int) -> int:
        return middle_layer_index(self.mid_nce_layer, num_hidden_states)

    def compute_loss_from_embeddings(
        self,
        embeddings: list[Tensor],
        labels: Tensor | None,
        middle_embeddings: list[Tensor] | None = None,
    ) -> Tensor | dict[str, Tensor]:
        """Compute the loss from the embeddings of the two columns.

        Args:
            embeddings: Two tensors of shape (batch_size, dim): the embeddings of sentence1 and sentence2.
            labels: Gold similarity scores, one per pair.
            middle_embeddings: The two columns' pooled middle-layer embeddings for the MidNCE term (see
                ``embed_with_middle_layer``); None leaves the term out.

        Returns:
            The weighted sum of the terms, or the weighted terms as a dict when ``return_dict`` is True.
        """
        if len(embeddings) != 2:
            raise ValueError(f"{self.__class__.__name__} expects embeddings of 2 columns, got {len(embeddings)}.")
        scores = self.similarity_fct(embeddings[0], embeddings[1])
        return self.compute_loss_from_scores(scores, labels, middle_embeddings=middle_embeddings)

    def compute_loss_from_scores(
        self, scores: Tensor, labels: Tensor | None, middle_embeddings: list[Tensor] | None = None
    ) -> Tensor | dict[str, Tensor]:
        """Compute the loss from the pairs' predicted similarities (gathered across devices if enabled).

        Args:
            scores: 1-D predicted similarity of each pair.
            labels: Gold similarity scores, one per pair.
            middle_embeddings: The two columns' pooled middle-layer embeddings, (batch_size, dim) each, for the
                MidNCE term; None (or ``mid_nce_weight=0``) leaves the term out.

        Returns:
            The weighted sum of the terms, or the weighted terms as a dict when ``return_dict`` is True.
        """
        _input_checks.check_sts_labels(type(self).__name__, labels)
        if labels is None:
            raise ValueError(
                f"{self.__class__.__name__} needs a gold similarity per pair, but the batch has no labels. "
                "Give the dataset a float 'score' (or 'label') column after the two text columns."
            )
        if labels.numel() != scores.numel():
            raise ValueError(
                f"{self.__class__.__name__} expects {scores.numel()} labels (one per pair), but got "
                f"{labels.numel()} labels with shape {tuple(labels.shape)}."
            )
        scores = scores.reshape(-1)
        if scores.dtype in (torch.float16, torch.bfloat16):
            scores = scores.float()
        labels = labels.reshape(-1).to(device=scores.device, dtype=scores.dtype)

        if middle_embeddings is not None and self.mid_nce_weight > 0:
            if len(middle_embeddings) != 2:
                raise ValueError(
                    f"{self.__class__.__name__} expects middle-layer embeddings of 2 columns, "
                    f"got {len(middle_embeddings)}."
                )
            middle_embeddings = [
                embedding.float() if embedding.dtype in (torch.float16, torch.bfloat16) else embedding
                for embedding in middle_embeddings
            ]
        else:
            middle_embeddings = None

        if self.gather_across_devices:
            scores = all_gather_with_grad(scores)
            labels = all_gather_with_grad(labels)
            if middle_embeddings is not None:
                middle_embeddings = [all_gather_with_grad(embedding) for embedding in middle_embeddings]

        # One host sync per batch. Checked on the gathered labels so that every rank raises together.
        if not bool(torch.isfinite(labels).all()):
            raise ValueError(
                f"{self.__class__.__name__} got NaN or infinite gold scores; clean or drop those rows of the score column."
            )

        terms = self._weighted_terms(scores, labels, middle_embeddings)
        if not terms:
            raise ValueError(
                f"{self.__class__.__name__} has only the middle-layer term switched on, which needs the middle-layer "
                "embeddings: call the loss on the features (forward) or pass `middle_embeddings`."
            )
        if self.return_dict:
            return terms
        return torch.stack(list(terms.values())).sum()

    def _weighted_terms(
        self, scores: Tensor, labels: Tensor, middle_embeddings: list[Tensor] | None
    ) -> dict[str, Tensor]:
        weighted = [
            ("pearson_loss", self.pearson_weight, lambda: pearson_loss(scores, labels)),
            ("rank_kl_loss", self.rank_kl_weight, lambda: rank_kl_loss(scores, labels, self.temperature)),
            ("pro_loss", self.pro_weight, lambda: pro_loss(scores, labels, self.temperature)),
        ]
        if middle_embeddings is not None:
            weighted.append(
                (
                    "mid_nce_loss",
                    self.mid_nce_weight,
                    lambda: mid_nce_loss(
                        *middle_embeddings, labels, self.mid_nce_temperature, self.mid_nce_threshold
                    ).to(scores.dtype),
                )
            )
        if scores.numel() < 2:
            logger.warning(
                "%s got a batch of %d pair(s); correlations need at least 2, so this batch contributes 0. "
                "Set `dataloader_drop_last=True` to drop a short last batch.",
                self.__class__.__name__,
                scores.numel(),
            )
            # Still attached to the graph, so DDP and the trainer see an ordinary (zero) loss.
            return {name: scores.sum() * 0.0 for name, weight, _ in weighted if weight > 0}
        return {name: weight * term() for name, weight, term in weighted if weight > 0}

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "pearson_weight": self.pearson_weight,
            "rank_kl_weight": self.rank_kl_weight,
            "pro_weight": self.pro_weight,
            "temperature": self.temperature,
            "gather_across_devices": self.gather_across_devices,
            "similarity_fct": getattr(self.similarity_fct, "__name__", repr(self.similarity_fct)),
            "mid_nce_weight": self.mid_nce_weight,
            "mid_nce_temperature": self.mid_nce_temperature,
            "mid_nce_threshold": self.mid_nce_threshold,
            "mid_nce_layer": self.mid_nce_layer,
            "sort_by_length": self.sort_by_length,
        }

    @property
    def citation(self) -> str:
        return CODIEMB_CITATION
