"""CocktailSoup: merging weights from each candidate's loss on a few examples (LM-Cocktail style), scored the
sentence-transformers way, then applied by the streaming merger.

LM-Cocktail (Xiao et al., 2023; FlagEmbedding's ``mix_models_with_data``) weights each candidate model by
softmax(−loss / T) of its contrastive loss on a handful of examples. Its reference code loads the encoder with
transformers' ``AutoModel`` and pools with CLS, so a mean-pooled sentence-transformers model is mis-scored, prompts are
ignored, and every candidate is held in memory at once. Here each candidate is loaded as the ``SentenceTransformer``
it is (its own modules, pooling, Dense/Normalize and prompts), scored with this package's task losses (IR examples
through :class:`~codiemb_st.MultiPositiveCachedInfoNCELoss`, STS pairs through :class:`~codiemb_st.PearsonSpearmanLoss`,
or both), and released before the next one is loaded; the weighted average is then streamed tensor by tensor like
every other merge (peak memory about one model). LoRA adapter candidates are materialised (base + scaling · B A)
into a temporary folder for scoring and read as θ_0 + δ by the merge.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from codiemb_st.merging.base import MergeMethod
from codiemb_st.merging.cocktail_examples import (
    MIN_EXAMPLES,
    ExampleSet,
    example_group_losses,
    example_loss,
    layer_group,
    load_example_sets,
)
from codiemb_st.merging.model_folder import ModelFolder
from codiemb_st.merging.soup import ModelSoup, WeightedAverage
from codiemb_st.merging.streaming_merge import check_checkpoints_argument, check_output_path, checkpoint_inputs
from codiemb_st.validation import check_bool, check_finite_float, check_int

if TYPE_CHECKING:
    from codiemb_st._compat import SentenceTransformer

logger = logging.getLogger(__name__)


@dataclass
class CocktailWeights:
    """The outcome of scoring: per candidate, its mean loss over the example sets and its merging weight.

    Attributes:
        losses: ``losses[c][f]``: candidate c's loss on example file f.
        mean_losses: The mean over files, L_c.
        weights: softmax_c(−L_c / T).
        group_losses: With layer groups: ``group_losses[g][c]``, candidate c's mean loss over the files at group g.
        group_weights: With layer groups: ``group_weights[g] = softmax_c(−group_losses[g][c] / T)``.
    """

    losses: list[list[float]]
    mean_losses: list[float]
    weights: list[float]
    group_losses: dict[str, list[float]] | None = None
    group_weights: dict[str, list[float]] | None = None


def cocktail_weights(mean_losses: Sequence[float], temperature: float) -> list[float]:
    """w_c = exp(−L_c / T) / Σ_c' exp(−L_c' / T), computed stably (float64)."""
    losses = torch.tensor(list(mean_losses), dtype=torch.float64)
    return torch.softmax(-losses / temperature, dim=0).tolist()


class CocktailSoup(MergeMethod, name="cocktail_soup"):
    """Data-aware Model Soup: weight each candidate by how well it does on a few examples, LM-Cocktail style.

    For K candidates θ_c and example files f = 1..F (IR records, STS pairs, or both), with ℓ_f(θ_c) the candidate's
    loss on file f (:func:`example_loss`: the task's training loss over all the file's examples, computed with the
    candidate's own modules, pooling and prompts)::

        L_c = (1/F) Σ_f ℓ_f(θ_c),      w_c = exp(−L_c / T) / Σ_c' exp(−L_c' / T),      θ = Σ_c w_c θ_c

    (equivalently θ_0 + Σ_c w_c δ_c, since Σ_c w_c = 1). T → ∞ gives the uniform Model Soup; small T picks the
    candidate with the lowest loss. LM-Cocktail's defaults are about 5 examples and T = 5.

    With ``layer_groups=True`` every layer group g (:func:`layer_group`: ``embeddings``, each transformer block,
    ``head``) gets its own weights w_{c,g} = softmax_c(−L_{c,g} / T), with L_{c,g} the candidate's mean loss over the
    files on the output of that group (:func:`example_group_losses`: the embedding output and each block's output
    pooled by the model's own Pooling; ``head`` is the model's final loss, L_c), and every tensor is averaged with its
    group's weights. Tensors of a group the scoring did not see (a block index beyond the hidden states) use the
    ``head`` weights.

    The candidates are loaded and scored one at a time (never all in memory); the weights are recorded in
    ``merge_config.json`` (``parameters.weights`` and ``parameters.losses``); then the weighted average is streamed
    tensor by tensor like every other merge. LoRA adapter candidates need ``base_model`` (as for every method): for
    scoring, each is materialised into a temporary folder (:class:`ModelSoup` of the one adapter), then removed.

    The weights are fitted on the examples: draw them from training data, never from the dev or test data the merge
    is judged on.

    Args:
        examples: One or more example files (``.jsonl``/``.jsonl.gz``, the record formats of
            :mod:`codiemb_st.data`: IR ``{"query", "positives"[, "negatives"]}`` or STS ``{"sentence1",
            "sentence2", "score"}``); the task is inferred per file. Each must hold at least 2 examples.
        temperature: T > 0. Defaults to 5.0 (LM-Cocktail's).
        num_examples: Draw this many records of each file at random (seeded); None uses every record.
        seed: Seed of that draw.
        batch_size: Texts embedded at once when scoring (does not change the loss).
        layer_groups: One set of weights per layer group instead of one per model (see above). Defaults to False.

    References:
        - Xiao et al., "LM-Cocktail: Resilient Tuning of Language Models via Model Merging", 2023.
          https://arxiv.org/abs/2311.13534
        - Wortsman et al., "Model soups", ICML 2022.

    Example:
        ::

            from codiemb_st.merging import CocktailSoup

            soup = CocktailSoup(["examples/ir-5.jsonl", "examples/sts-5.jsonl"], temperature=5.0)
            merged = soup.merge(["runs/ir", "runs/sts", "runs/joint"], output_path="merged-cocktail")
            print(soup.fitted.weights)
    """

    requires_base = False
    keeps_agreement = True
    min_checkpoints = 2

    def __init__(
        self,
        examples: str | Path | Sequence[str | Path] | None = None,
        temperature: float = 5.0,
        num_examples: int | None = None,
        seed: int = 0,
        batch_size: int = 32,
        layer_groups: bool = False,
    ) -> None:
        if examples is None:
            raise ValueError(
                "CocktailSoup needs examples= (on the command line --examples FILE [FILE ...]): one or more JSONL "
                "files of IR records or STS pairs to score the candidates on."
            )
        paths = [examples] if isinstance(examples, (str, os.PathLike)) else examples
        if not isinstance(paths, Sequence) or not paths or not all(isinstance(p, (str, os.PathLike)) for p in paths):
            raise TypeError(f"examples must be a file path or a list of file paths, got {examples!r}.")
        for path in paths:
            if not Path(path).is_file():
                raise ValueError(f"examples: {str(path)!r} is not a file (JSONL IR records or STS pairs).")
        self.examples = [str(path) for path in paths]
        self.temperature = float(check_finite_float("temperature", temperature, minimum=0.0, strict_minimum=True))
        if num_examples is not None:
            num_examples = check_int("num_examples", num_examples, minimum=MIN_EXAMPLES)
        self.num_examples = num_examples
        self.seed = check_int("seed", seed)
        self.batch_size = check_int("batch_size", batch_size, minimum=1)
        self.layer_groups = check_bool("layer_groups", layer_groups)
        #: The fitted losses and weights (after :meth:`fit`, :meth:`merge` or :meth:`merge_to_folder`).
        self.fitted: CocktailWeights | None = None

    def load_examples(self) -> list[ExampleSet]:
        """The example sets (read and checked; drawn when ``num_examples`` is set)."""
        return load_example_sets(self.examples, self.num_examples, self.seed)

    def fit(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        *,
        base_model: str | Path | SentenceTransformer | None = None,
    ) -> CocktailWeights:
        """Score every candidate on the examples, one at a time, and set the merging weights.

        Args:
            checkpoints: The K >= 2 candidates (model folders, LoRA adapter folders, or ``SentenceTransformer``
                objects).
            base_model: The base model; needed for LoRA adapter candidates.

        Returns:
            The losses and weights (also kept as :attr:`fitted`).

        Raises:
            ValueError: Bad examples (see :func:`load_example_sets`), or a candidate whose loss is not finite.
        """
        from codiemb_st._compat import SentenceTransformer

        checkpoints = check_checkpoints_argument(checkpoints)  # the merge's own argument checks, before any scoring
        example_sets = self.load_examples()
        if len(checkpoints) < self.min_checkpoints:
            raise ValueError(
                f"CocktailSoup needs at least {self.min_checkpoints} checkpoints, got {len(checkpoints)}."
            )
        losses = []
        for index, checkpoint in enumerate(checkpoints):
            role = f"checkpoints[{index}]" + (f" ({checkpoint})" if isinstance(checkpoint, (str, Path)) else "")
            scored = self._score(checkpoint, base_model, f"checkpoints[{index}]", example_sets, SentenceTransformer)
            gc.collect()  # the candidate is unreachable now: free it before the next one is loaded
            for by_group, examples in zip(scored, example_sets):
                for group, value in by_group.items():
                    if not math.isfinite(value):
                        where = "" if group == "head" else f" at layer group {group}"
                        raise ValueError(
                            f"{role} has a {value} loss{where} on the examples in {examples.path}: its weights or "
                            "outputs are not finite. Leave this candidate out."
                        )
            logger.info(f"CocktailSoup: {role} losses {scored}")
            losses.append(scored)
        head = [[by_group["head"] for by_group in scored] for scored in losses]
        mean_losses = [sum(own) / len(own) for own in head]
        self.fitted = CocktailWeights(head, mean_losses, cocktail_weights(mean_losses, self.temperature))
        if self.layer_groups:
            groups = [group for group in losses[0][0] if all(group in by_group for c in losses for by_group in c)]
            group_losses = {
                group: [sum(by_group[group] for by_group in c) / len(c) for c in losses] for group in groups
            }
            self.fitted.group_losses = group_losses
            self.fitted.group_weights = {g: cocktail_weights(v, self.temperature) for g, v in group_losses.items()}
        return self.fitted

    def for_tensor(self, module_index: int, tensor_name: str) -> MergeMethod:
        """The merge of one tensor (used by the streaming merge): the weighted average with its layer group's weights
        (``layer_groups=True``), else this method itself."""
        if not self.layer_groups or self.fitted is None or not self.fitted.group_weights:
            return self
        weights = self.fitted.group_weights
        return WeightedAverage(weights.get(layer_group(module_index, tensor_name), weights["head"]))

    def _score(
        self, checkpoint: Any, base_model: Any, role: str, example_sets: list[ExampleSet], model_class: type
    ) -> list[dict[str, float]]:
        """One candidate's losses (per example file, by layer group); the model is released when this returns (before the next one is loaded)."""
        with _loaded(checkpoint, base_model, role, model_class) as model:
            if self.layer_groups:
                return [example_group_losses(model, examples, self.batch_size) for examples in example_sets]
            return [{"head": example_loss(model, examples, self.batch_size)} for examples in example_sets]

    def merge_rows(self, checkpoints: Tensor, base: Tensor | None, statistics: Any = None) -> Tensor:
        if self.fitted is None:
            raise ValueError("CocktailSoup has no weights yet: call fit() (or merge / merge_to_folder) first.")
        weights = torch.tensor(self.fitted.weights, dtype=checkpoints.dtype)
        if weights.shape[0] != checkpoints.shape[0]:
            raise ValueError(f"CocktailSoup was fitted on {weights.shape[0]} checkpoints, got {checkpoints.shape[0]}.")
        return torch.tensordot(weights, checkpoints, dims=1)

    def merge(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        *,
        base_model: str | Path | SentenceTransformer | None = None,
        output_path: str | Path | None = None,
        show_progress_bar: bool = True,
    ) -> SentenceTransformer:
        """Fit the weights on the examples (:meth:`fit`), then merge and load (see :meth:`MergeMethod.merge`)."""
        self._check_output(output_path, checkpoints, base_model)
        self.fit(checkpoints, base_model=base_model)
        return super().merge(
            checkpoints, base_model=base_model, output_path=output_path, show_progress_bar=show_progress_bar
        )

    def merge_to_folder(
        self,
        checkpoints: Sequence[str | Path | SentenceTransformer],
        output_path: str | Path,
        *,
        base_model: str | Path | SentenceTransformer | None = None,
        show_progress_bar: bool = True,
    ) -> Path:
        """Fit the weights on the examples (:meth:`fit`), then write the merged folder and return its path."""
        self._check_output(output_path, checkpoints, base_model)
        self.fit(checkpoints, base_model=base_model)
        return super().merge_to_folder(
            checkpoints, output_path, base_model=base_model, show_progress_bar=show_progress_bar
        )

    def _check_output(self, output_path: str | Path | None, checkpoints: Any, base_model: Any) -> None:
        """Refuse an output path that exists or overlaps an input (the examples too) before the slow scoring."""
        if output_path is None:
            return
        inputs = checkpoint_inputs(check_checkpoints_argument(checkpoints), base_model)
        check_output_path(output_path, [*inputs, *((f"examples[{i}]", path) for i, path in enumerate(self.examples))])

    def checkpoint_weights(self, num_checkpoints: int) -> list[float] | None:
        """The fitted weights softmax(−L_c / T); None with ``layer_groups`` (one set per layer group)."""
        if self.fitted is None or self.fitted.group_weights:
            return None
        return list(self.fitted.weights)

    def get_config_dict(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "examples": self.examples,
            "temperature": self.temperature,
            "num_examples": self.num_examples,
            "seed": self.seed,
        }
        if self.layer_groups:
            config["layer_groups"] = True
        if self.fitted is not None:
            config |= {"weights": self.fitted.weights, "losses": self.fitted.losses}
            if self.fitted.group_weights is not None:
                config |= {"group_weights": self.fitted.group_weights, "group_losses": self.fitted.group_losses}
        return config

    def __repr__(self) -> str:
        return (
            f"CocktailSoup(examples={self.examples!r}, temperature={self.temperature!r}, "
            f"num_examples={self.num_examples!r}, seed={self.seed!r}"
            + (", layer_groups=True)" if self.layer_groups else ")")
        )


class _loaded:
    """Context manager: the candidate as a SentenceTransformer, released (and its temporary folder removed) after."""

    def __init__(self, checkpoint: Any, base_model: Any, role: str, model_class: type) -> None:
        self.checkpoint, self.base_model, self.role, self.model_class = checkpoint, base_model, role, model_class
        self.tmp: tempfile.TemporaryDirectory | None = None
        self.model = None

    def __enter__(self) -> SentenceTransformer:
        if isinstance(self.checkpoint, self.model_class):
            return self.checkpoint
        path = Path(self.checkpoint)
        if ModelFolder.open(path, self.role).adapters:
            if self.base_model is None:
                raise ValueError(
                    f"{self.role} is a LoRA adapter checkpoint, so base_model= is required: its weights are the base "
                    "model's plus scaling * B A. Pass the pre-trained model the adapters were trained on."
                )
            # The adapter's full weights (base + scaling * B A), for scoring only.
            self.tmp = tempfile.TemporaryDirectory(prefix="codiemb_cocktail_")
            path = ModelSoup().merge_to_folder(
                [path], Path(self.tmp.name) / "candidate", base_model=self.base_model, show_progress_bar=False
            )
        self.model = self.model_class(str(path))
        return self.model

    def __exit__(self, *exc_info: Any) -> None:
        self.model = None
        gc.collect()
        if self.tmp is not None:
            self.tmp.cleanup()


__all__ = ["CocktailSoup", "CocktailWeights", "cocktail_weights"]
