"""LoRA adapter checkpoints as merge inputs: materialise each checkpoint's weights as θ_0 + δ, tensor by tensor.

A LoRA fine-tune does not change the base weights; it adds, to each adapted weight W (shape ``out x in``), the
low-rank delta ``δ = scaling · B A`` (``B``: ``out x r``, ``A``: ``r x in``, ``scaling = lora_alpha / r``, or
``lora_alpha / sqrt(r)`` with rsLoRA). Merging LoRA fine-tunes by averaging the ``A`` and ``B`` matrices separately
is wrong: the mean of products is not the product of means. The right input to a merge is the delta itself, so an
adapter checkpoint is read as the full model ``θ_c = θ_0 + δ_c``, computed on the fly, row slice by row slice, while
the merge streams the base model: the materialised model never exists in memory or on disk.

The layout read here is the one sentence-transformers writes after ``model.add_adapter(LoraConfig(...))`` (or with a
``peft.PeftModel`` as the Transformer's model): the Transformer module folder holds ``adapter_config.json`` and
``adapter_model.safetensors`` instead of ``config.json`` and ``model.safetensors``; the other modules (Pooling,
Normalize, ...) and the tokenizer are saved as usual. Tensor names in the adapter file are peft's: the module path
prefixed with ``base_model.model.``, e.g. ``base_model.model.layers.0.self_attn.q_proj.lora_A.weight``.

Supported, per adapted module: ``nn.Linear`` (``lora_A``/``lora_B``, also with ``fan_in_fan_out``), ``nn.Embedding``
(``lora_embedding_A``/``lora_embedding_B``), per-module ranks and alphas (``rank_pattern``/``alpha_pattern``; the rank
is read off the matrices), rsLoRA, and tensors stored whole (``modules_to_save``, trained biases with
``bias="all"``/``"lora_only"``), which replace the base tensor. Refused with a clear error: other peft methods than
LoRA, DoRA (``use_dora``: its magnitude vector rescales the whole weight), ``lora_bias``, convolution adapters,
``target_parameters`` and any tensor this module does not understand, so nothing is silently dropped.

The checks that adapters fit together and their base (:func:`check_adapter_bases`,
:func:`warn_on_adapter_base_mismatch`) live here too. Layering: this module does I/O (it reads adapter files with
:class:`~codiemb_st.merging.safetensors_stream.RowReader`) and is used by :mod:`codiemb_st.merging.model_folder` and
the streaming merge; the merge methods never see adapters, only materialised rows.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from codiemb_st.merging.safetensors_stream import RowReader
from codiemb_st.merging.tensor_math import compute_dtype

logger = logging.getLogger(__name__)

#: The files of a saved peft adapter.
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
#: Adapter weights in formats that cannot be streamed.
UNSUPPORTED_ADAPTER_WEIGHTS = ("adapter_model.bin", "adapter_model.pt")
#: peft prefixes every tensor name of a saved adapter with this (the PeftModel -> LoraModel -> base model path).
PEFT_PREFIX = "base_model.model."

_LORA_SUFFIXES = {
    # adapter tensor suffix -> (matrix, layer kind)
    ".lora_A.weight": ("A", "linear"),
    ".lora_B.weight": ("B", "linear"),
    ".lora_embedding_A": ("A", "embedding"),
    ".lora_embedding_B": ("B", "embedding"),
}


def is_adapter_folder(folder: str | Path) -> bool:
    """Whether a (module) folder holds a peft adapter (an ``adapter_config.json``)."""
    return (Path(folder) / ADAPTER_CONFIG_NAME).is_file()


@dataclass(frozen=True)
class LoraDelta:
    """How to compute δ for one base tensor: ``scaling · B A``, transposed when ``transposed``."""

    #: The base tensor it applies to, e.g. ``layers.0.self_attn.q_proj.weight``.
    target: str
    #: Names of the A (``r x in``) and B (``out x r``) matrices in the adapter file.
    a_name: str
    b_name: str
    rank: int
    scaling: float
    #: True when the weight is stored ``in x out``: embeddings (``(B A)^T``, peft's ``lora_embedding_*``) and
    #: ``fan_in_fan_out`` layers (GPT-2's Conv1D).
    transposed: bool


def lora_delta_rows(a: Tensor, b: Tensor, scaling: float, transposed: bool, start: int, stop: int) -> Tensor:
    """Rows ``start:stop`` of δ = scaling · B A (or of its transpose), without forming the whole δ.

    Args:
        a: The A matrix, ``r x in``, in the compute dtype.
        b: The B matrix, ``out x r``, in the compute dtype.
        scaling: ``lora_alpha / r`` (``lora_alpha / sqrt(r)`` for rsLoRA).
        transposed: Whether the weight is stored transposed (``in x out``).
        start: First row.
        stop: One past the last row.

    Returns:
        The rows of the delta, shape ``(stop - start, in)`` (``(stop - start, out)`` when transposed).
    """
    if transposed:
        # Rows of (B A)^T are columns of B A: B @ A[:, rows], transposed.
        return (b @ a[:, start:stop]).T.mul_(scaling)
    return (b[start:stop] @ a).mul_(scaling)


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """peft's rule for ``rank_pattern``/``alpha_pattern``: the first key matching the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module_name):
            return value
    return default


def _strip_peft_names(name: str) -> str:
    """The base-model tensor name behind a saved adapter tensor name (without the LoRA suffix)."""
    name = name.removeprefix(PEFT_PREFIX)
    # Tensors of wrapped layers saved whole (trained biases) keep peft's ``base_layer`` level in their names.
    return name.replace(".base_layer.", ".")


@dataclass
class LoraAdapter:
    """A LoRA adapter saved by peft / sentence-transformers, parsed and checked.

    Use :meth:`open`; then :meth:`check_base` against the base model's tensors before reading.
    """

    folder: Path
    role: str
    config: dict[str, Any]
    #: Tensor name in the adapter file -> (safetensors dtype string, shape).
    specs: dict[str, tuple[str, list[int]]]
    #: Base tensor name -> its LoRA delta.
    deltas: dict[str, LoraDelta] = field(default_factory=dict)
    #: Base tensor name -> the adapter tensor that replaces it (``modules_to_save``, trained biases, and the
    #: embedding matrix peft saves whole when embeddings are targeted; a delta, if any, is added to it).
    replacements: dict[str, str] = field(default_factory=dict)

    @property
    def weights_file(self) -> Path:
        return self.folder / ADAPTER_WEIGHTS_NAME

    @property
    def files(self) -> list[Path]:
        """The adapter's own files (never copied into a merged model, which needs no peft)."""
        return [self.folder / ADAPTER_CONFIG_NAME, self.weights_file]

    @property
    def base_model_name_or_path(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @classmethod
    def open(cls, folder: str | Path, role: str) -> LoraAdapter:
        """Read and validate the adapter in ``folder``; ``role`` names it in errors (e.g. "checkpoints[1]").

        Raises:
            ValueError: If the adapter is not a LoRA adapter this module can materialise exactly, or its files are
                missing, unreadable or inconsistent.
        """
        folder = Path(folder)
        config_file = folder / ADAPTER_CONFIG_NAME
        try:
            config = json.loads(config_file.read_text(encoding="utf8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{role}: cannot read the adapter configuration {config_file}: {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{role}: {config_file} is not a JSON object.")
        _check_supported_config(config, role, config_file)
        weights = folder / ADAPTER_WEIGHTS_NAME
        if not weights.is_file():
            other = [name for name in UNSUPPORTED_ADAPTER_WEIGHTS if (folder / name).is_file()]
            hint = (
                f" It holds {other[0]}, which cannot be streamed; save the adapter with safetensors." if other else ""
            )
            raise ValueError(f"{role}: the adapter in {folder} has no {ADAPTER_WEIGHTS_NAME}.{hint}")
        specs = _read_specs(weights, role)
        adapter = cls(folder=folder, role=role, config=config, specs=specs)
        adapter._index_tensors()
        return adapter

    def _index_tensors(self) -> None:
        matrices: dict[str, dict[str, tuple[str, str]]] = {}  # module -> {"A"/"B": (tensor name, kind)}
        for name in self.specs:
            for suffix, (matrix, kind) in _LORA_SUFFIXES.items():
                if name.endswith(suffix):
                    module = _strip_peft_names(name.removesuffix(suffix))
                    matrices.setdefault(module, {})[matrix] = (name, kind)
                    break
            else:
                if "lora_" in name or "magnitude" in name:
                    raise ValueError(
                        f"{self.role}: the adapter tensor {name!r} is not a LoRA A/B matrix of a Linear or Embedding "
                        "layer (DoRA, lora_bias and convolution adapters cannot be materialised here)."
                    )
                # Stored whole: replaces the base tensor (modules_to_save, trained biases).
                self.replacements[_strip_peft_names(name)] = name
        alpha = self.config.get("lora_alpha", 8)
        for module, parts in sorted(matrices.items()):
            if set(parts) != {"A", "B"}:
                missing = "B" if "A" in parts else "A"
                raise ValueError(f"{self.role}: the adapter has no lora_{missing} matrix for module {module!r}.")
            (a_name, kind), (b_name, _) = parts["A"], parts["B"]
            a_shape, b_shape = self.specs[a_name][1], self.specs[b_name][1]
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise ValueError(
                    f"{self.role}: the LoRA matrices of {module!r} have shapes A {a_shape}, B {b_shape}; expected "
                    "A (r, in) and B (out, r) (convolution adapters are not supported)."
                )
            rank = a_shape[0]
            module_alpha = _pattern_value(self.config.get("alpha_pattern") or {}, module, alpha)
            scaling = module_alpha / math.sqrt(rank) if self.config.get("use_rslora") else module_alpha / rank
            transposed = kind == "embedding" or bool(self.config.get("fan_in_fan_out"))
            target = f"{module}.weight"
            self.deltas[target] = LoraDelta(target, a_name, b_name, rank, float(scaling), transposed)

    def check_base(self, base_specs: dict[str, tuple[str, list[int]]], base_role: str) -> None:
        """Check that every tensor the adapter changes exists in the base with a matching shape.

        Raises:
            ValueError: If the adapter was trained on another base model (names or shapes differ).
        """
        unknown = sorted(name for name in (*self.deltas, *self.replacements) if name not in base_specs)
        if unknown:
            raise ValueError(
                f"{self.role}: its adapter changes tensors that {base_role} does not have: {unknown[:5]} "
                f"({len(unknown)} in all). Was it trained on another base model "
                f"(its adapter_config.json says base_model_name_or_path={self.base_model_name_or_path!r})?"
            )
        for target, delta in self.deltas.items():
            a_shape, b_shape = self.specs[delta.a_name][1], self.specs[delta.b_name][1]
            expected = [a_shape[1], b_shape[0]] if delta.transposed else [b_shape[0], a_shape[1]]
            shape = base_specs[target][1]
            if shape != expected:
                raise ValueError(
                    f"{self.role}: its LoRA delta for {target!r} has shape {expected}, but the tensor has shape "
                    f"{shape} in {base_role}. The adapter was trained on another base model "
                    f"(base_model_name_or_path={self.base_model_name_or_path!r})."
                )
        for target, name in self.replacements.items():
            if self.specs[name][1] != base_specs[target][1]:
                raise ValueError(
                    f"{self.role}: its adapter stores {target!r} with shape {self.specs[name][1]}, {base_role} with "
                    f"shape {base_specs[target][1]}. The adapter was trained on another base model."
                )


def _check_supported_config(config: dict[str, Any], role: str, config_file: Path) -> None:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "LORA":
        raise ValueError(
            f"{role}: {config_file} describes a {config.get('peft_type')!r} adapter; only LoRA adapters can be "
            "merged (their weights are the base plus scaling * B A)."
        )
    for key, reason in (
        ("use_dora", "DoRA rescales the whole weight by a learned magnitude"),
        ("lora_bias", "lora_bias adds a trained bias to lora_B"),
        ("target_parameters", "LoRA on raw parameters (target_parameters)"),
    ):
        if config.get(key):
            raise ValueError(
                f"{role}: {config_file} sets {key}; {reason}, which is not supported. Merge the adapter into its "
                "base with peft (model.merge_and_unload()), save the full model and merge that instead."
            )


def _read_specs(file: Path, role: str) -> dict[str, tuple[str, list[int]]]:
    try:
        with safe_open(str(file), framework="pt") as handle:
            specs = {}
            for name in handle.keys():
                tensor_slice = handle.get_slice(name)
                specs[name] = (tensor_slice.get_dtype(), list(tensor_slice.get_shape()))
            return specs
    except Exception as exc:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{role}: cannot read the adapter weights {file}: {exc}") from exc


class AdapterRowReader:
    """Reads rows of a LoRA checkpoint's weights, θ_c = θ_0 + δ_c, from the base model's files and the adapter.

    It has the interface of :class:`~codiemb_st.merging.safetensors_stream.RowReader`. Tensors the adapter does not
    change are read from the base as stored, bit for bit. Adapted tensors are returned in the compute dtype (float32,
    or float64 for a float64 base), base rows plus the rows of δ, so that a bf16 base is not rounded twice; replaced
    tensors are read from the adapter as stored. Only one tensor's A and B are held at a time.

    Args:
        base_files: Tensor name -> the base model's safetensors file holding it.
        adapter: The checked adapter (see :meth:`LoraAdapter.check_base`).
    """

    def __init__(self, base_files: dict[str, Path], adapter: LoraAdapter) -> None:
        self.adapter = adapter
        self.tensor_files = base_files
        self._base = RowReader(base_files)
        names = [name for delta in adapter.deltas.values() for name in (delta.a_name, delta.b_name)]
        names += list(adapter.replacements.values())
        self._adapter = RowReader({name: adapter.weights_file for name in names})
        self._matrices: tuple[str, Tensor, Tensor] | None = None  # (target, A, B) of the tensor being read

    def _source(self, name: str) -> tuple[RowReader, str]:
        """Where the checkpoint's value before δ is stored: the adapter (tensors saved whole) or the base."""
        if name in self.adapter.replacements:
            return self._adapter, self.adapter.replacements[name]
        return self._base, name

    def dtype(self, name: str) -> torch.dtype:
        reader, stored_name = self._source(name)
        stored = reader.dtype(stored_name)
        return compute_dtype(stored) if name in self.adapter.deltas else stored

    def read(self, name: str, start: int | None = None, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` of the checkpoint's tensor ``name`` (see ``RowReader.read``)."""
        reader, stored_name = self._source(name)
        if name not in self.adapter.deltas:
            return reader.read(stored_name, start, stop, out=out)
        delta = self.adapter.deltas[name]
        dtype = self.dtype(name)
        rows = reader.read(stored_name, start, stop).to(dtype)
        a, b = self._lora_matrices(delta, dtype)
        first = 0 if start is None else start
        rows += lora_delta_rows(a, b, delta.scaling, delta.transposed, first, first + rows.shape[0])
        if out is None:
            return rows
        if out.dtype != dtype or out.numel() != rows.numel() or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of {rows.numel()} elements to read {name!r}.")
        out.view(rows.shape).copy_(rows)
        return out.view(rows.shape)

    def _lora_matrices(self, delta: LoraDelta, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._matrices is None or self._matrices[0] != delta.target:
            a = self._adapter.read(delta.a_name).to(dtype)
            b = self._adapter.read(delta.b_name).to(dtype)
            self._matrices = (delta.target, a, b)
        return self._matrices[1], self._matrices[2]

    def close(self) -> None:
        self._base.close()
        self._adapter.close()
        self._matrices = None

    def __enter__(self) -> AdapterRowReader:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


#: ``(role of the checkpoint, module index, adapter)`` of every adapter module among the checkpoints.
AdapterModules = Sequence[tuple[str, int, "LoraAdapter"]]


def check_adapter_bases(adapters: AdapterModules) -> None:
    """Refuse LoRA checkpoints recorded as trained on different base models (``base_model_name_or_path``).

    The names are compared as written (local folders by their resolved path). Shapes are checked against the base
    in :meth:`~codiemb_st.merging.model_folder.ModelFolder.attach_base`; two bases of identical shapes can only be
    told apart by this name.

    Raises:
        ValueError: Naming both checkpoints and their recorded bases.

    Example:
        ::

            check_adapter_bases([("checkpoints[0]", 0, adapter_a), ("checkpoints[1]", 0, adapter_b)])
    """
    seen: dict[int, tuple[str, str | None]] = {}  # module index -> (role, normalised base name)
    for role, index, adapter in adapters:
        name = normalised_base_name(adapter.base_model_name_or_path)
        if index not in seen:
            seen[index] = (role, name)
        elif seen[index][1] != name:
            raise ValueError(
                f"{role} is a LoRA adapter on base_model_name_or_path={adapter.base_model_name_or_path!r}, "
                f"{seen[index][0]} on {seen[index][1]!r}: adapters on different base models cannot be merged (their "
                "deltas are relative to different weights). If both names denote the same model, make them equal "
                "in adapter_config.json."
            )


def warn_on_adapter_base_mismatch(
    adapters: AdapterModules, base_path: Path, base_recorded_names: Mapping[int, str | None]
) -> None:
    """Warn when a LoRA checkpoint records another base model than the one given (``base_model_name_or_path``).

    Shapes are checked in :meth:`~codiemb_st.merging.model_folder.ModelFolder.attach_base`; a base of identical
    shapes that is another model can only be told by this name. The recorded name matches when it is the base folder
    (resolved) or the name the base's module records (``_name_or_path`` of its ``config.json``), or when it ends with
    the base folder's name (a local copy of a hub model, ``Qwen/Qwen2-0.5B`` -> ``models/Qwen2-0.5B``).

    Args:
        adapters: The adapter modules of the checkpoints.
        base_path: The base model's folder.
        base_recorded_names: Module index -> the ``_name_or_path`` of the base's ``config.json`` in that module.

    Example:
        ::

            warn_on_adapter_base_mismatch([("checkpoints[0]", 0, adapter)], Path("models/base"), {0: "org/base"})
    """
    resolved = base_path.resolve()
    for role, index, adapter in adapters:
        recorded = adapter.base_model_name_or_path
        if not recorded:
            continue
        names = {str(resolved), base_recorded_names.get(index)}
        if normalised_base_name(recorded) in names or recorded.rstrip("/").split("/")[-1] == resolved.name:
            continue
        logger.warning(
            f"{role} is a LoRA adapter recorded as trained on base_model_name_or_path={recorded!r}, but "
            f"base_model is {str(base_path)!r}. The shapes fit, so the merge goes on; if that is not the model the "
            "adapter was trained on, the result is wrong. Pass the recorded base model as base_model (or fix "
            "base_model_name_or_path in adapter_config.json)."
        )


def normalised_base_name(name: str | None) -> str | None:
    """A recorded base model name as compared: a local folder by its resolved path, a Hub id as written."""
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name


__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "AdapterModules",
    "AdapterRowReader",
    "LoraAdapter",
    "LoraDelta",
    "check_adapter_bases",
    "is_adapter_folder",
    "lora_delta_rows",
    "normalised_base_name",
    "warn_on_adapter_base_mismatch",
]
