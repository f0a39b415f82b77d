"""The layout of a saved sentence-transformers model folder, as far as merging needs it, and compatibility checks.

A folder saved by sentence-transformers 6.x holds ``modules.json`` (one entry per module: index, name, folder ``path``
and class ``type``), ``config_sentence_transformers.json`` (prompts, similarity function) and one folder per module.
The first module (the Transformer) is usually saved in the root folder itself (``"path": ""``): its
``model.safetensors``, ``config.json``, ``sentence_bert_config.json`` and tokenizer files lie next to ``modules.json``.
Other modules with weights (e.g. ``2_Dense/model.safetensors``) keep them in their own folder. Large Transformers may
be sharded (``model.safetensors.index.json`` plus shard files).

Weight files are identified by (module index, path inside the module folder), so inputs whose modules live in
differently named folders still line up.

A module folder holding a LoRA adapter (``adapter_config.json`` + ``adapter_model.safetensors``, see
:mod:`codiemb_st.merging.adapters`) has no weights of its own: :meth:`ModelFolder.attach_base` gives it the base
model's weight files, read through :class:`~codiemb_st.merging.adapters.AdapterRowReader` as θ_0 + δ.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from codiemb_st.merging.adapters import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    AdapterRowReader,
    LoraAdapter,
    is_adapter_folder,
)
from codiemb_st.merging.compatibility import (
    MODEL_SETTING_KEYS,
    config_differences,
    describe,
    pooling_settings,
    settings_differences,
    transformer_settings,
    warn_settings,
)
from codiemb_st.merging.safetensors_stream import RowReader, is_float_dtype

logger = logging.getLogger(__name__)

#: Files that hold weights in a format this package does not merge; they are never copied into a merged folder.
UNMERGEABLE_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".ot", ".gguf")
#: Folders of exported copies of the weights (ONNX/OpenVINO backends); stale after a merge, never copied.
EXPORT_FOLDERS = ("onnx", "openvino")
#: Files that define a tokenizer's vocabulary: they must be identical in all inputs.
VOCABULARY_FILES = (
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)

#: Tokenizer settings files: checked through their vocabulary only, other settings come from checkpoints[0].
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
)

WeightFileKey = tuple[int, str]


def read_json_file(file: Path, role: str, expected: type | None = None) -> Any:
    """The JSON value in ``file`` of the input ``role``; a malformed file names the role, the file and what to do.

    Args:
        file: The JSON file.
        role: The input it belongs to (e.g. ``"checkpoints[1]"``, ``"base"``), for the message.
        expected: ``dict`` or ``list`` to require that kind of value (``None``: any).

    Raises:
        ValueError: If the file is not UTF-8, not valid JSON, or not of the ``expected`` kind.
    """
    try:
        value = json.loads(file.read_text(encoding="utf8"))
    except UnicodeDecodeError as error:
        raise ValueError(f"{role}: {file} is not UTF-8 text ({error.reason}); the model folder is damaged.") from None
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{role}: {file} is not valid JSON ({error.msg} at line {error.lineno}, column {error.colno}); the model "
            "folder is damaged or was not saved completely. Save the model again with SentenceTransformer.save()."
        ) from None
    if expected is not None and not isinstance(value, expected):
        kind = "an object" if expected is dict else "a list"
        raise ValueError(f"{role}: {file} must hold {kind}; got {type(value).__name__}.")
    return value


@dataclass
class WeightFile:
    """One logical safetensors weight file of a module (a single file, or the shards behind an index)."""

    key: WeightFileKey
    #: Tensor name -> the safetensors file holding it.
    tensor_files: dict[str, Path]
    #: Tensor name -> (safetensors dtype string such as "F32", shape).
    specs: dict[str, tuple[str, list[int]]]
    #: The ``__metadata__`` of the (first) file, e.g. {"format": "pt"}.
    metadata: dict[str, str] | None
    #: The files this logical weight file consists of (excluded when copying the other files).
    files: list[Path] = field(default_factory=list)


@dataclass
class ModelFolder:
    """A sentence-transformers model folder: its modules and its safetensors weight files."""

    path: Path
    role: str
    modules: list[dict[str, Any]]
    weight_files: dict[WeightFileKey, WeightFile]
    #: Module index -> the LoRA adapter that module holds instead of weights (see :meth:`attach_base`).
    adapters: dict[int, LoraAdapter] = field(default_factory=dict)
    #: The base model whose weights the adapters apply to, once attached.
    base: ModelFolder | None = None

    @classmethod
    def open(cls, path: str | Path, role: str) -> ModelFolder:
        """Read the layout of the folder at ``path``; ``role`` names it in errors (e.g. "checkpoints[1]", "base")."""
        path = Path(path)
        if not path.is_dir():
            raise ValueError(f"{role} {str(path)!r} is not a folder. Pass a sentence-transformers model folder.")
        modules_file = path / "modules.json"
        if not modules_file.is_file():
            raise ValueError(
                f"{role} {str(path)!r} has no modules.json, so it is not a sentence-transformers model folder. "
                "Load it with SentenceTransformer(...) and pass the object, or save that object with .save(folder)."
            )
        modules = read_json_file(modules_file, role, list)
        if not all(isinstance(m, dict) and isinstance(m.get("type"), str) for m in modules):
            raise ValueError(f"{role}: {modules_file} is not a list of modules with a 'type' each.")
        for module in modules:
            module_path = module.get("path", "")
            if not isinstance(module_path, str) or Path(module_path).is_absolute() or ".." in Path(module_path).parts:
                raise ValueError(
                    f"{role}: {modules_file} gives module {module.get('name', module['type'])!r} the path "
                    f"{module_path!r}; a module path must be a folder name inside the model folder."
                )
        weight_files: dict[WeightFileKey, WeightFile] = {}
        adapters: dict[int, LoraAdapter] = {}
        for index, module in enumerate(modules):
            module_path = module.get("path", "")
            if is_adapter_folder(path / module_path):
                adapters[index] = LoraAdapter.open(path / module_path, f"{role} (module {index})")
            elif (path / module_path / ADAPTER_WEIGHTS_NAME).is_file():
                raise ValueError(
                    f"{role}: {path / module_path} holds {ADAPTER_WEIGHTS_NAME} but no {ADAPTER_CONFIG_NAME}, so it is "
                    "a LoRA adapter whose rank, alpha and target modules are unknown. Copy the adapter_config.json "
                    "saved with it (peft's save_pretrained writes both files) into that folder."
                )
            for weight_file in _find_weight_files(path, index, module_path, role):
                if index in adapters and weight_file.files[0].name == ADAPTER_WEIGHTS_NAME:
                    continue  # the adapter's matrices are not weights of the module; attach_base materialises them
                weight_files[weight_file.key] = weight_file
        return cls(path=path, role=role, modules=modules, weight_files=weight_files, adapters=adapters)

    def attach_base(self, base: ModelFolder) -> None:
        """Give the adapter modules the base model's weight files, checked against the adapters.

        After this, the folder looks like a full checkpoint (same weight files, tensor names and shapes as the
        base); :meth:`row_reader` reads its adapted tensors as θ_0 + δ.

        Raises:
            ValueError: If the base holds adapters itself, or an adapter does not fit the base's tensors.
        """
        if base.adapters:
            raise ValueError(
                f"{base.role} {str(base.path)!r} holds a LoRA adapter; the base must be the full pre-trained model "
                "the adapters were trained on."
            )
        for index, adapter in self.adapters.items():
            if len(base.modules) <= index:
                raise ValueError(f"{self.role} has an adapter in module {index}, which {base.role} does not have.")
            base_files = {key: file for key, file in base.weight_files.items() if key[0] == index}
            if not base_files:
                raise ValueError(
                    f"{base.role} has no safetensors weights in module {index} for the adapter of {self.role}."
                )
            own = {key: file for key, file in self.weight_files.items() if key[0] == index}
            if own:
                raise ValueError(
                    f"{self.role}: module {index} holds both an adapter and weight files {sorted(k[1] for k in own)}."
                )
            specs = {name: spec for file in base_files.values() for name, spec in file.specs.items()}
            adapter.check_base(specs, base.role)
            self.weight_files.update(base_files)
        self.base = base

    def row_reader(self, key: WeightFileKey) -> RowReader | AdapterRowReader:
        """A reader of one logical weight file: the stored tensors, or θ_0 + δ for a module holding an adapter."""
        tensor_files = self.weight_files[key].tensor_files
        if key[0] in self.adapters:
            if self.base is None:
                raise ValueError(f"{self.role} holds a LoRA adapter: attach its base model first (attach_base).")
            return AdapterRowReader(tensor_files, self.adapters[key[0]])
        return RowReader(tensor_files)

    def adapter_file_paths(self) -> set[Path]:
        """The adapters' own files (adapter_config.json, adapter_model.safetensors)."""
        return {file for adapter in self.adapters.values() for file in adapter.files}

    def base_config_files(self) -> list[tuple[Path, Path]]:
        """(file in the base, path relative to this folder) for the configuration files an adapter module lacks.

        A module saved as an adapter has no ``config.json``; a merged (full) model needs the base's.
        """
        if self.base is None:
            return []
        copies = []
        for index in self.adapters:
            source = self.base.module_folder(index) / "config.json"
            target = self.module_folder(index) / "config.json"
            if source.is_file() and not target.is_file():
                copies.append((source, target.relative_to(self.path)))
        return copies

    def weights_sha256(self) -> str:
        """The SHA-256 of the folder's own weight files (safetensors, shards and index, LoRA adapter files): their
        paths relative to the folder and their bytes, in path order. What ``merge_config.json`` records per input.

        It reads every weight file once more (hashlib runs at about 1 GB/s; the merge itself reads each file one to
        four times). The base's weights that :meth:`attach_base` lent to adapter modules are not this folder's.
        """
        import hashlib

        files = {
            file
            for weight_file in self.weight_files.values()
            if weight_file.key[0] not in self.adapters
            for file in weight_file.files
        } | self.adapter_file_paths()
        digest = hashlib.sha256()
        for relative, file in sorted((file.relative_to(self.path).as_posix(), file) for file in files):
            digest.update(f"{relative}\0{file.stat().st_size}\0".encode())
            with open(file, "rb") as handle:
                while chunk := handle.read(8 * 2**20):
                    digest.update(chunk)
        return digest.hexdigest()

    def module_folder(self, index: int) -> Path:
        return self.path / self.modules[index].get("path", "")

    def module_class(self, index: int) -> str:
        """The module's class name, without its import path (ST moved modules between versions)."""
        return str(self.modules[index]["type"]).rsplit(".", 1)[-1]

    def weight_file_paths(self) -> set[Path]:
        return {file for weight_file in self.weight_files.values() for file in weight_file.files}

    def read_json(self, relative_path: str | Path, expected: type | None = None) -> Any | None:
        """The JSON value of a file in the folder, ``None`` if there is none (malformed: see :func:`read_json_file`)."""
        file = self.path / relative_path
        return read_json_file(file, self.role, expected) if file.is_file() else None


def _module_scope(root: Path, module_path: str) -> list[Path]:
    """The files of one module: the root module owns the root's files only; other modules their whole folder."""
    folder = root / module_path
    if not folder.is_dir():
        return []
    if folder.resolve() == root.resolve():
        return sorted(p for p in folder.iterdir() if p.is_file())
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _find_weight_files(root: Path, index: int, module_path: str, role: str) -> list[WeightFile]:
    folder = root / module_path
    files = _module_scope(root, module_path)
    sharded: dict[Path, list[Path]] = {}
    for index_file in (f for f in files if f.name.endswith(".safetensors.index.json")):
        weight_map = read_json_file(index_file, role, dict).get("weight_map", {})
        if not isinstance(weight_map, dict) or not all(isinstance(shard, str) for shard in weight_map.values()):
            raise ValueError(f"{role}: {index_file} has no valid `weight_map` (tensor name -> shard file).")
        sharded[index_file] = sorted({index_file.parent / shard for shard in weight_map.values()})
    shard_files = {shard for shards in sharded.values() for shard in shards}

    found = []
    for file in files:
        if file.suffix == ".safetensors" and file not in shard_files:
            found.append(_read_weight_file((index, file.relative_to(folder).as_posix()), [file], role))
    for index_file, shards in sharded.items():
        logical_name = index_file.relative_to(folder).as_posix().removesuffix(".index.json")
        found.append(_read_weight_file((index, logical_name), shards, role, index_file))

    # A directory with weights in a format we cannot stream would silently keep unmerged weights: refuse.
    weight_dirs = {w.files[0].parent for w in found}
    for file in files:
        if file.suffix in UNMERGEABLE_WEIGHT_SUFFIXES and file.parent not in weight_dirs:
            raise ValueError(
                f"{role}: {file} holds weights in a format that cannot be streamed (only safetensors can). Convert "
                "the model first: SentenceTransformer(path).save(new_path) writes model.safetensors."
            )
    return found


def _read_weight_file(key: WeightFileKey, files: list[Path], role: str, index_file: Path | None = None) -> WeightFile:
    tensor_files: dict[str, Path] = {}
    specs: dict[str, tuple[str, list[int]]] = {}
    metadata = None
    for file in files:
        if not file.is_file():
            raise ValueError(f"{role}: the shard {file} listed in {index_file} is missing.")
        try:
            with safe_open(str(file), framework="pt") as handle:
                metadata = metadata if metadata is not None else handle.metadata()
                for name in handle.keys():
                    if name in specs:
                        raise ValueError(
                            f"{role}: tensor {name!r} is stored twice, in {tensor_files[name]} and {file}."
                        )
                    tensor_slice = handle.get_slice(name)
                    specs[name] = (tensor_slice.get_dtype(), list(tensor_slice.get_shape()))
                    tensor_files[name] = file
        except ValueError:
            raise
        except Exception as exc:  # safetensors raises its own error types for corrupt headers
            raise ValueError(f"{role}: cannot read the safetensors file {file}: {exc}") from exc
    all_files = list(files) + ([index_file] if index_file is not None else [])
    return WeightFile(key=key, tensor_files=tensor_files, specs=specs, metadata=metadata, files=all_files)


def _config_files(folder: ModelFolder, index: int) -> dict[str, Any]:
    """A module's own JSON configuration, keyed by path inside the module folder."""
    module_folder = folder.module_folder(index)
    if module_folder.resolve() == folder.path.resolve():
        # The root also holds model-level files (modules.json, prompts) and possibly other records: compare only
        # the Transformer's own configuration.
        names = ("config.json", "sentence_bert_config.json")
        files = [module_folder / name for name in names if (module_folder / name).is_file()]
    else:
        files = [
            f
            for f in _module_scope(folder.path, folder.modules[index].get("path", ""))
            if f.suffix == ".json"
            and f.name not in TOKENIZER_FILES
            and f.name != ADAPTER_CONFIG_NAME  # adapters may differ (rank, targets); they are checked on their own
            and not f.name.endswith(".index.json")
        ]
    # config.json must be an object: its model_type is compared across inputs.
    configs = {
        f.relative_to(module_folder).as_posix(): read_json_file(
            f, folder.role, dict if f.name in ("config.json", "sentence_bert_config.json") else None
        )
        for f in files
    }
    if index in folder.adapters and "config.json" not in configs and folder.base is not None:
        # An adapter module has no config.json of its own: its architecture is the base's.
        base_config = folder.base.module_folder(index) / "config.json"
        if base_config.is_file():
            configs["config.json"] = read_json_file(base_config, folder.base.role, dict)
    return configs


def check_compatible(reference: ModelFolder, other: ModelFolder, *, is_checkpoint: bool) -> None:
    """Raise ValueError if ``other`` cannot be merged with ``reference`` (the first checkpoint); warn about settings.

    All inputs must have the same module classes, the same architecture (the Transformer's ``config.json`` up to
    incidental keys), the same tokenizer vocabulary, the same weight files with the same tensor names and shapes, and
    checkpoints the same configuration of every other module with weights (Dense). Settings may differ: incidental
    ``config.json`` keys, Pooling, ``sentence_bert_config.json`` (``max_seq_length``, ...) and prompts. The merged
    folder takes them from ``reference`` (its files are copied), and each difference is logged at WARNING with the
    values and how to take the other (see :mod:`codiemb_st.merging.compatibility`). The base's settings are never
    used, so its differences are logged at INFO.
    """
    ref, role = reference.role, other.role
    classes = [reference.module_class(i) for i in range(len(reference.modules))]
    other_classes = [other.module_class(i) for i in range(len(other.modules))]
    if classes != other_classes:
        raise ValueError(
            f"{role} ({other.path}) has the modules {other_classes}, {ref} ({reference.path}) has {classes}: the "
            "module lists must agree (modules.json). Merge models with the same modules."
        )

    transformer_configs = []
    settings = []  # (what, differences, file, level): logged once the inputs are known to be compatible
    for index in range(len(classes)):
        ref_configs, other_configs = _config_files(reference, index), _config_files(other, index)
        ref_type = (ref_configs.get("config.json") or {}).get("model_type")
        other_type = (other_configs.get("config.json") or {}).get("model_type")
        if ref_type != other_type:
            raise ValueError(
                f"{role} ({other.path}) is a {other_type!r} model, {ref} ({reference.path}) a {ref_type!r} model "
                "(model_type in config.json): architectures differ, so their weights cannot be merged. Merge "
                "checkpoints fine-tuned from the same pre-trained model."
            )
        has_weights = index in reference.adapters or any(key[0] == index for key in reference.weight_files)
        for name in sorted(ref_configs.keys() | other_configs.keys()):
            a, b = ref_configs.get(name), other_configs.get(name)
            relative = (Path(reference.modules[index].get("path", "")) / name).as_posix()
            if name == "config.json" and ref_type is not None and is_checkpoint:
                settings += _check_architecture(reference, other, [(relative, a, b)], is_checkpoint)
            elif name == "config.json" and ref_type is not None:
                transformer_configs.append((relative, a, b))
            elif not is_checkpoint:
                continue  # the base's settings are not used
            elif has_weights and ref_type is None and a != b:
                # A module with weights of its own (Dense): its configuration (activation, bias) is its computation.
                raise ValueError(
                    f"Module {index} ({classes[index]}) of {role} ({other.path}) has a different configuration in "
                    f"{name} than {ref} ({reference.path}): "
                    f"{describe(settings_differences(a, b, skip_absent=False), ref, role)}. It "
                    "defines how the module's weights are used, so the checkpoints cannot be merged: merge "
                    "checkpoints with the same modules."
                )
            elif classes[index] == "Pooling" and name == "config.json":
                differences = settings_differences(pooling_settings(a), pooling_settings(b))
                settings.append((f"The Pooling settings ({relative})", differences, relative, logging.WARNING))
            elif name == "sentence_bert_config.json" and ref_type is not None:
                tokenizer_config = Path(reference.modules[index].get("path", "")) / "tokenizer_config.json"
                differences = settings_differences(
                    transformer_settings(a, reference.read_json(tokenizer_config)),
                    transformer_settings(b, other.read_json(tokenizer_config)),
                )
                settings.append(
                    (f"The {classes[index]} settings ({relative})", differences, relative, logging.WARNING)
                )
            else:
                differences = settings_differences(a, b)
                settings.append(
                    (f"The {classes[index]} settings ({relative})", differences, relative, logging.WARNING)
                )
    if is_checkpoint:
        differences = settings_differences(_model_settings(reference), _model_settings(other))
        settings.append(
            ("The prompts and similarity settings", differences, "config_sentence_transformers.json", logging.WARNING)
        )

    _check_vocabulary(reference, other)
    _check_tensors(reference, other, is_checkpoint)
    # A base of another size is best named by its shapes: its architecture is compared after its tensors.
    settings += _check_architecture(reference, other, transformer_configs, is_checkpoint)
    for what, differences, file, level in settings:
        warn_settings(differences, what, _label(reference), _label(other), file=file, level=level)


def _label(folder: ModelFolder) -> tuple[str, str]:
    return folder.role, str(folder.path)


def _model_settings(folder: ModelFolder) -> dict[str, Any]:
    """The model-level settings of ``config_sentence_transformers.json``, as sentence-transformers reads them (no
    ``prompts`` key means no prompts; no ``similarity_fn_name`` means cosine)."""
    config = folder.read_json("config_sentence_transformers.json", dict) or {}
    settings = {key: config.get(key) for key in MODEL_SETTING_KEYS}
    settings["prompts"] = settings["prompts"] or {}
    settings["similarity_fn_name"] = settings["similarity_fn_name"] or "cosine"
    return settings


def _check_architecture(
    reference: ModelFolder, other: ModelFolder, configs: list[tuple[str, Any, Any]], is_checkpoint: bool
) -> list[tuple[str, dict[str, Any], str, int]]:
    """Refuse architecture differences in the Transformer's ``config.json``; return the incidental ones to log."""
    ref, role = reference.role, other.role
    incidental_differences = []
    for relative, a, b in configs:
        architecture, incidental = config_differences(a or {}, b or {})
        if architecture:
            raise ValueError(
                f"{role} ({other.path}) has another architecture than {ref} ({reference.path}) in {relative}: "
                f"{describe(architecture, ref, role)}. These keys change the tensors or the computation, so the "
                "weights cannot be merged: merge checkpoints fine-tuned from the same pre-trained model (and, if a "
                "key only records a setting the computation does not depend on, make it equal in one input's "
                f"{relative})."
            )
        level = logging.WARNING if is_checkpoint else logging.INFO
        incidental_differences.append((f"Incidental {relative} keys", incidental, relative, level))
    return incidental_differences


def _check_vocabulary(reference: ModelFolder, other: ModelFolder) -> None:
    for index in range(len(reference.modules)):
        ref_folder, other_folder = reference.module_folder(index), other.module_folder(index)
        for name in VOCABULARY_FILES:
            a, b = ref_folder / name, other_folder / name
            if a.is_file() and b.is_file() and a.read_bytes() != b.read_bytes():
                raise ValueError(f"The tokenizer vocabulary ({name}) of {other.role} differs from {reference.role}'s.")
        a, b = ref_folder / "tokenizer.json", other_folder / "tokenizer.json"
        if a.is_file() and b.is_file():
            vocab_a = read_json_file(a, reference.role, dict).get("model")
            vocab_b = read_json_file(b, other.role, dict).get("model")
            if vocab_a != vocab_b:
                raise ValueError(
                    f"The tokenizer vocabulary (tokenizer.json) of {other.role} differs from {reference.role}'s."
                )


def _check_tensors(reference: ModelFolder, other: ModelFolder, is_checkpoint: bool = True) -> None:
    """Same weight files, tensor names, shapes and kinds of dtype. A base may hold extra tensors (e.g. the
    ``embeddings.position_ids`` buffer older transformers versions saved): the merge reads only the checkpoints'
    tensors from it."""
    ref, role = reference.role, other.role
    if reference.weight_files.keys() != other.weight_files.keys():
        missing = sorted(reference.weight_files.keys() - other.weight_files.keys())
        extra = sorted(other.weight_files.keys() - reference.weight_files.keys())
        raise ValueError(
            f"{role} has different weight files than {ref} (module index, file): missing {missing}, extra {extra}."
        )
    for key, ref_file in reference.weight_files.items():
        other_file = other.weight_files[key]
        missing = sorted(ref_file.specs.keys() - other_file.specs.keys())
        extra = sorted(other_file.specs.keys() - ref_file.specs.keys())
        # Integer buffers (``embeddings.position_ids``, which older transformers versions saved) hold no weights: a
        # checkpoint may have them or not. The merged model has checkpoints[0]'s.
        buffers = [name for name in missing if not is_float_dtype(ref_file.specs[name][0])]
        buffers += [name for name in extra if not is_float_dtype(other_file.specs[name][0])]
        missing = [name for name in missing if name not in buffers]
        extra = [name for name in extra if name not in buffers or not is_checkpoint]
        if extra and not missing and not is_checkpoint:
            logger.info(f"{role} has tensors the checkpoints lack, not used by the merge: {extra[:5]}")
        elif missing or extra:
            raise ValueError(
                f"{role} has different tensor names in module {key[0]} ({key[1]}) than {ref}: missing "
                f"{missing[:5]}, extra {extra[:5]} ({len(missing)} missing, {len(extra)} extra). The merge averages "
                f"tensors of the same name: merge checkpoints of the same architecture ({role}: {other.path}, {ref}: "
                f"{reference.path})."
            )
        elif buffers and is_checkpoint:
            logger.info(
                f"Integer buffers only one of {ref} and {role} holds, not weights: {buffers[:5]}; the merged model "
                f"has {ref}'s."
            )
        for name, (dtype, shape) in ref_file.specs.items():
            if name not in other_file.specs:
                continue  # an integer buffer the other input lacks (see above); copied from checkpoints[0]
            other_dtype, other_shape = other_file.specs[name]
            if shape != other_shape:
                raise ValueError(f"Tensor {name!r} has shape {other_shape} in {role} and {shape} in {ref}.")
            if is_float_dtype(dtype) != is_float_dtype(other_dtype):
                raise ValueError(f"Tensor {name!r} has dtype {other_dtype} in {role} and {dtype} in {ref}.")
