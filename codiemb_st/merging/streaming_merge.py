"""Merge sentence-transformers model folders tensor by tensor into a new folder, written atomically.

What the merged folder contains:

- Every safetensors weight file of ``checkpoints[0]`` (the Transformer's ``model.safetensors``, a Dense module's, ...;
  a sharded model becomes one ``model.safetensors``), with every tensor merged by the method. Floating-point tensors
  are merged in float32 (float64 for float64 weights) and cast back to the dtype of ``checkpoints[0]``. Integer and
  bool tensors, and row slices on which all inputs agree, are copied bit for bit from ``checkpoints[0]``.
- Every other file of ``checkpoints[0]`` (modules.json, config_sentence_transformers.json with its prompts,
  Pooling/Dense/Normalize configurations, config.json, tokenizer files), copied as is: the checkpoints must agree in
  architecture, module types and tensors, while settings (Pooling, prompts, incidental config.json keys) may differ
  and are taken from ``checkpoints[0]`` with a warning (:mod:`~codiemb_st.merging.compatibility`). Not copied:
  README.md (the model card of one checkpoint does not describe the merge), weights in other formats (.bin, .pt, ...)
  and ONNX/OpenVINO exports, which would be stale. A ``merge_config.json`` records the method, its parameters and
  every input (path and a SHA-256 of its weight files), the base included.
- For LoRA adapter checkpoints (a Transformer folder with ``adapter_config.json`` + ``adapter_model.safetensors``,
  see :mod:`codiemb_st.merging.adapters`): the weights are read as base + scaling · B A, the output holds the full
  weights and the base's ``config.json`` instead of the adapter files, so it loads without peft.

Memory: tensors are read in row slices of at most :data:`SLICE_BUDGET_BYTES` (all inputs together, in the compute
dtype), merged, and appended to the output file, so peak memory is a few slices, whatever the number and size of the
inputs. Methods whose weights depend on the whole tensor (DeltaSoup with ``granularity="tensor"`` or ``rescale``,
ModelStock, TIES, SLERP/MultiSLERP's Gram matrix) read each tensor once per statistics pass (one, two for TIES's
exact top-k thresholds on float32 weights), then once to merge. A method with a ``for_tensor(module_index, name)``
method merges each tensor with the method it returns (CocktailSoup's per-layer-group weights).

Atomicity: the folder is written to a hidden temporary folder next to ``output_path``
(``.<name>.<pid>.<random>.partial``) and renamed into place only when complete; on any error (or Ctrl-C) the
temporary folder is removed and nothing appears at ``output_path``. A process killed outright (``kill -9``, a crash
of the machine) can leave the hidden temporary folder behind, never a partial ``output_path``; the next merge into
the same ``output_path`` removes such a folder once its process is gone (with a warning).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from codiemb_st._compat import SentenceTransformer
from codiemb_st.merging.model_folder import (
    EXPORT_FOLDERS,
    UNMERGEABLE_WEIGHT_SUFFIXES,
    ModelFolder,
    WeightFile,
    check_adapter_bases,
    check_compatible,
    is_float_dtype,
    warn_on_adapter_base_mismatch,
)
from codiemb_st.merging.safetensors_stream import RowReader, SafetensorsStreamWriter, torch_dtype
from codiemb_st.merging.tensor_math import RowMerger, compute_dtype, fold_statistics

logger = logging.getLogger(__name__)

#: Upper bound on the bytes of one row slice of all inputs together, in the compute dtype. The merge math needs a few
#: times this (deltas, scores), so the working memory stays in the tens of MB for any model. Measured on an
#: mpnet-base-sized merge (1 thread): 8 MiB was about 2x faster than 32 MiB (smaller buffers are reused by the
#: allocator and stay in cache) and no slower than 2-4 MiB (fewer Python round trips).
SLICE_BUDGET_BYTES = 8 * 2**20

ModelInput = str | Path | SentenceTransformer


def merge_and_load(
    method: RowMerger,
    checkpoints: Sequence[ModelInput],
    *,
    base_model: ModelInput | None = None,
    output_path: str | Path | None = None,
    show_progress_bar: bool = True,
) -> SentenceTransformer:
    """Merge into ``output_path`` (or a temporary folder when None) and load the result (``MergeMethod.merge``)."""
    if output_path is not None:
        path = merge_model_folders(
            method, checkpoints, output_path, base_model=base_model, show_progress_bar=show_progress_bar
        )
        return SentenceTransformer(str(path))
    with tempfile.TemporaryDirectory(prefix="codiemb_merged_") as tmp:
        path = merge_model_folders(
            method, checkpoints, Path(tmp) / "merged", base_model=base_model, show_progress_bar=show_progress_bar
        )
        return SentenceTransformer(str(path))


def merge_model_folders(
    method: RowMerger,
    checkpoints: Sequence[ModelInput],
    output_path: str | Path,
    *,
    base_model: ModelInput | None = None,
    show_progress_bar: bool = True,
    copy_single: bool = False,
) -> Path:
    """Merge the checkpoints into a new model folder at ``output_path`` and return its path.

    Args:
        method: The merge method (DeltaSoup, ModelSoup, TaskArithmetic, ...): anything with the
            :class:`~codiemb_st.merging.tensor_math.RowMerger` interface.
        checkpoints: The model folders or SentenceTransformer objects to merge: at least two distinct ones, or one
            where the result is not a copy (see :func:`check_checkpoint_count`).
        output_path: The folder to create; it must not exist (an empty folder is replaced) and must not be, lie
            inside, or hold an input folder (see :func:`check_output_path`).
        base_model: The pre-trained model (folder or object); required when ``method.requires_base``.
        show_progress_bar: Show a progress bar per weight file.
        copy_single: Write one checkpoint as it is (GreedySoup's first soup) instead of refusing it.
    """
    base = base_model
    checkpoints = check_checkpoints_argument(checkpoints)
    if base is None and method.requires_base:
        raise ValueError(
            f"{type(method).__name__} needs base_model=: the pre-trained model the checkpoints were fine-tuned from "
            "(a model folder or a SentenceTransformer)."
        )
    if base is not None and not isinstance(base, (str, Path, SentenceTransformer)):
        raise TypeError(f"base_model must be a model folder path or a SentenceTransformer, got {type(base).__name__}.")
    if not isinstance(output_path, (str, Path)):
        raise TypeError(f"output_path must be a path, got {type(output_path).__name__}.")
    output_path = Path(output_path).absolute()
    check_output_path(output_path, checkpoint_inputs(checkpoints, base))

    with _as_folders(checkpoints, base) as (checkpoint_paths, base_path):
        folders = [ModelFolder.open(path, f"checkpoints[{i}]") for i, path in enumerate(checkpoint_paths)]
        base_folder = ModelFolder.open(base_path, "base") if base_path is not None else None
        _attach_adapter_base(method, folders, base_folder)
        for folder in folders[1:]:
            check_compatible(folders[0], folder, is_checkpoint=True)
        if base_folder is not None:
            check_compatible(folders[0], base_folder, is_checkpoint=False)
        if not copy_single:
            check_checkpoint_count(method, checkpoints, single_adapter=len(folders) == 1 and bool(folders[0].adapters))
        inputs = folders + ([base_folder] if base_folder is not None and method.requires_base else [])

        created_parents = _make_parents(output_path.parent)
        try:
            remove_stale_work_folders(output_path, ".partial")
            tmp = Path(
                tempfile.mkdtemp(prefix=work_folder_prefix(output_path), suffix=".partial", dir=output_path.parent)
            )
        except BaseException:
            _remove_created(created_parents)
            raise
        try:
            config = _merge_record(method, checkpoints, folders, base, base_folder)
            _copy_non_weight_files(folders[0], tmp)
            for source, relative in folders[0].base_config_files():  # an adapter module has no config.json
                shutil.copy2(source, tmp / relative)
            for key in folders[0].weight_files:
                target = tmp / (folders[0].module_folder(key[0]) / key[1]).relative_to(folders[0].path)
                target.parent.mkdir(parents=True, exist_ok=True)
                _merge_weight_file(method, inputs, key, target, show_progress_bar)
            (tmp / "merge_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf8")
            if output_path.is_dir() and not any(output_path.iterdir()):
                output_path.rmdir()  # an empty folder the caller prepared
            os.rename(tmp, output_path)  # atomic; fails rather than overwriting anything
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_created(created_parents)  # a failed merge leaves nothing behind, not even empty parents
            raise
    logger.info(f"Merged {len(folders)} checkpoints with {method!r} into {output_path}")
    return output_path


def _merge_record(
    method: RowMerger,
    checkpoints: list[ModelInput],
    folders: list[ModelFolder],
    base: ModelInput | None,
    base_folder: ModelFolder | None,
) -> dict[str, Any]:
    """What ``merge_config.json`` records: the method, its parameters, and every input with a hash of its weights."""
    adapters = [folder.role for folder in folders if folder.adapters]
    config: dict[str, Any] = {
        "method": type(method).__name__,
        "parameters": method.get_config_dict(),
        "num_checkpoints": len(folders),
        "checkpoints": [_input_record(given, folder) for given, folder in zip(checkpoints, folders)],
        "base_model": None,
        # The merged folder's non-weight files (modules, Pooling, prompts, tokenizer, config.json) are its copies.
        "settings_from": "checkpoints[0]",
    }
    if base_folder is not None:
        # ModelSoup only checks a base it is given; adapters are read as base + delta whatever the method.
        config["base_model"] = {**_input_record(base, base_folder), "used": bool(method.requires_base or adapters)}
    if adapters:
        config["lora_checkpoints"] = adapters  # materialised as base + scaling * B A
    return config


def _input_record(given: ModelInput | None, folder: ModelFolder) -> dict[str, Any]:
    """``{"path", "weights_sha256"}`` of one input; the path is None for a SentenceTransformer object (saved to a
    temporary folder for the merge, so only its weights' hash identifies it)."""
    path = None if isinstance(given, SentenceTransformer) else str(Path(given).absolute())
    return {"path": path, "weights_sha256": folder.weights_sha256()}


def _attach_adapter_base(method: RowMerger, folders: list[ModelFolder], base_folder: ModelFolder | None) -> None:
    """Let LoRA adapter checkpoints read as base + δ: they need the base model, whatever the method."""
    adapters = [folder for folder in folders if folder.adapters]
    if not adapters:
        return
    if base_folder is None:
        raise ValueError(
            f"{adapters[0].role} is a LoRA adapter checkpoint, so base_model= is required (also for "
            f"{type(method).__name__}): its weights are the base model's plus scaling * B A. Pass the pre-trained "
            "model the adapters were trained on."
        )
    check_adapter_bases(adapters)
    for folder in adapters:
        folder.attach_base(base_folder)
    warn_on_adapter_base_mismatch(adapters, base_folder)


def distinct_checkpoints(checkpoints: Sequence[ModelInput]) -> int:
    """How many different checkpoints: folders counted by resolved path, model objects by identity."""
    return len({id(c) if isinstance(c, SentenceTransformer) else str(Path(c).resolve()) for c in checkpoints})


def check_checkpoint_count(method: object, checkpoints: Sequence[ModelInput], *, single_adapter: bool = False) -> None:
    """The one rule of every method that combines checkpoints: no output that is a copy of an input.

    At least two distinct checkpoints (or the method's ``min_checkpoints``) are needed, with two exceptions where one
    checkpoint means something: a method whose single-checkpoint result is a new model
    (:meth:`~codiemb_st.merging.MergeMethod.one_checkpoint_copies` is None: TaskArithmetic's θ_0 + λ · δ at
    λ ∉ {0, 1}, TIES's trimmed task vector), and ModelSoup of one LoRA adapter checkpoint (``single_adapter``), which
    materialises the adapter as a full model, with a warning saying so. One checkpoint otherwise, or the same one
    given twice, would come out as a copy of itself (or of the base) while the call looks like a merge: refused.

    Raises:
        ValueError: Naming the method, the number of checkpoints given and of distinct ones, and what to do.
    """
    name = type(method).__name__
    minimum = getattr(method, "min_checkpoints", 2)
    needed = max(2, minimum)
    distinct = distinct_checkpoints(checkpoints)
    if distinct >= needed:
        return
    copies = method.one_checkpoint_copies() if hasattr(method, "one_checkpoint_copies") else "checkpoint"
    if len(checkpoints) == 1 and minimum <= 1 and copies is None:
        logger.info(f"{method!r} of one checkpoint: the base plus its scaled (or trimmed) task vector.")
        return
    if single_adapter and name == "ModelSoup" and len(checkpoints) == 1:
        logger.warning(
            "ModelSoup of one LoRA adapter checkpoint: the output is that adapter materialised on base_model "
            "(base + scaling * B A) as a full model, not a merge of several checkpoints."
        )
        return
    given = f"{len(checkpoints)} checkpoint(s)" + (f", {distinct} distinct" if distinct != len(checkpoints) else "")
    copy_of = "the base" if copies == "base" and len(checkpoints) == 1 else "the input"
    advice = "Pass two or more different checkpoints"
    if name in ("TaskArithmetic", "TIES") and len(checkpoints) == 1:
        advice += (
            f" (one checkpoint with {method!r} is a copy: {name} of one checkpoint needs a scale other than 0 and 1"
        )
        advice += ", or a density below 1)" if name == "TIES" else ")"
    raise ValueError(
        f"{name} combines checkpoints and needs at least {needed} distinct ones; got {given} (the same folder "
        f"twice counts once). The output would be a copy of {copy_of}, not a merge. {advice}"
        + (
            "; to materialise one LoRA adapter as a full model, use ModelSoup with that adapter."
            if name != "ModelSoup"
            else "."
        )
    )


def work_folder_prefix(output_path: Path) -> str:
    """The prefix of a hidden work folder for ``output_path``: ``.<name>.<pid>.`` (the pid tells a stale one)."""
    return f".{output_path.name}.{os.getpid()}."


def remove_stale_work_folders(output_path: Path, suffix: str) -> list[Path]:
    """Remove hidden work folders for ``output_path`` whose process is gone (a merge killed mid-write); return them.

    Folders of a process still running (a concurrent merge) are left alone, and so is anything not named
    ``.<name>.<pid>.<random><suffix>``.
    """
    removed = []
    prefix = f".{output_path.name}."
    for folder in output_path.parent.glob(f"{glob_escape(prefix)}*{suffix}"):
        pid_text = folder.name[len(prefix) :].split(".", 1)[0]
        if not folder.is_dir() or not pid_text.isdigit() or _process_alive(int(pid_text)):
            continue
        logger.warning(f"Removing {folder}: the unfinished work of a merge (process {pid_text}) that was killed.")
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    return removed


def glob_escape(text: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OSError:
        return False
    return True


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_created(folders: list[Path]) -> None:
    for folder in folders:  # deepest first; stops at the first folder something else wrote into
        try:
            folder.rmdir()
        except OSError:
            break


def check_checkpoints_argument(checkpoints: Sequence[ModelInput]) -> list[ModelInput]:
    if isinstance(checkpoints, (str, Path, SentenceTransformer)) or not isinstance(checkpoints, Sequence):
        raise TypeError("checkpoints must be a list of model folders or SentenceTransformer objects.")
    checkpoints = list(checkpoints)
    if not checkpoints:
        raise ValueError("checkpoints is empty: pass at least one model to merge.")
    for index, checkpoint in enumerate(checkpoints):
        if not isinstance(checkpoint, (str, Path, SentenceTransformer)):
            raise TypeError(
                f"checkpoints[{index}] must be a model folder path or a SentenceTransformer, "
                f"got {type(checkpoint).__name__}."
            )
    return checkpoints


@contextmanager
def _as_folders(checkpoints: list[ModelInput], base: ModelInput | None) -> Iterator[tuple[list[Path], Path | None]]:
    """Model folders for the inputs: SentenceTransformer objects are saved to a temporary folder (removed after)."""
    with ExitStack() as stack:
        saved: dict[int, Path] = {}

        def as_folder(model: ModelInput) -> Path:
            if not isinstance(model, SentenceTransformer):
                return Path(model).absolute()
            if id(model) not in saved:
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="codiemb_merge_input_")))
                model.save(str(tmp), create_model_card=False)
                saved[id(model)] = tmp
            return saved[id(model)]

        checkpoint_paths = [as_folder(checkpoint) for checkpoint in checkpoints]
        yield checkpoint_paths, (as_folder(base) if base is not None else None)


def check_output_path(output_path: str | Path, inputs: Sequence[tuple[str, ModelInput | str | Path | None]]) -> None:
    """Refuse an ``output_path`` that is, or lies inside, an input, or holds one (the merge replaces the folder
    whole), and one that already exists (an empty folder is fine). Called before anything is loaded.

    Paths are compared after resolving symlinks and ``..``. The command line applies the same rule with its option
    names (:func:`codiemb_st.cli.output_rule.check_output_apart`).

    Args:
        output_path: The folder the merge creates.
        inputs: ``(role, path)`` of everything the merge reads: ``checkpoints[i]``, ``base_model``, ``examples[j]``,
            evaluation data. ``SentenceTransformer`` objects and None are skipped.

    Raises:
        ValueError: Naming ``output_path``, the input's role and path, and the fix.
    """
    target = Path(output_path).absolute()
    resolved = target.resolve()
    for role, path in inputs:
        if path is None or isinstance(path, SentenceTransformer):
            continue
        source = Path(path).absolute().resolve()
        if resolved == source or source in resolved.parents:
            raise ValueError(
                f"output_path {str(target)!r} is, or lies inside, the input {role} {str(path)!r}: inputs are never "
                "modified. Choose another output_path."
            )
        if resolved in source.parents:
            raise ValueError(
                f"output_path {str(target)!r} holds the input {role} {str(path)!r}: the merge writes the output "
                "folder as a whole, which would replace that input. Choose another output_path."
            )
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise ValueError(f"output_path {str(target)!r} already exists. Choose a new path or remove it first.")


def checkpoint_inputs(
    checkpoints: Sequence[ModelInput], base_model: ModelInput | None
) -> list[tuple[str, ModelInput | None]]:
    """``(role, input)`` of the checkpoints and the base, for :func:`check_output_path`."""
    return [*((f"checkpoints[{i}]", c) for i, c in enumerate(checkpoints)), ("base_model", base_model)]


def _copy_non_weight_files(template: ModelFolder, destination: Path) -> None:
    weight_files = template.weight_file_paths() | template.adapter_file_paths()

    def ignore(directory: str, names: list[str]) -> set[str]:
        ignored = set()
        at_root = Path(directory).resolve() == template.path.resolve()
        for name in names:
            path = Path(directory) / name
            if path in weight_files or path.suffix in UNMERGEABLE_WEIGHT_SUFFIXES:
                ignored.add(name)
            elif at_root and (
                name == "README.md" or name in EXPORT_FOLDERS or (name.startswith(".") and path.is_dir())
            ):
                ignored.add(name)
        return ignored

    shutil.copytree(template.path, destination, ignore=ignore, dirs_exist_ok=True)


def _merge_weight_file(
    method: RowMerger, inputs: list[ModelFolder], key: tuple[int, str], target: Path, show_progress_bar: bool
) -> None:
    """Merge one logical weight file of every input into ``target``; the base is ``inputs[-1]`` if the method uses it."""
    template: WeightFile = inputs[0].weight_files[key]
    num_checkpoints = len(inputs) - (1 if method.requires_base else 0)
    roles = [folder.role for folder in inputs]
    with ExitStack() as stack:
        readers = [stack.enter_context(folder.row_reader(key)) for folder in inputs]
        writer = stack.enter_context(SafetensorsStreamWriter(target, template.specs, template.metadata))
        description = f"Merging {inputs[0].module_class(key[0])} ({key[1]})"
        for name in tqdm(template.specs, desc=description, unit="tensor", disable=not show_progress_bar):
            dtype_name, shape = template.specs[name]
            if not is_float_dtype(dtype_name):
                _copy_tensor(name, shape, readers, roles, writer)
                continue
            # A method may merge each tensor its own way (CocktailSoup's per-layer-group weights).
            merger = method.for_tensor(key[0], name) if hasattr(method, "for_tensor") else method
            # Methods with per-tensor statistics read the tensor once per statistics pass before merging it.
            statistics = fold_statistics(
                merger, functools.partial(_read_slices, name, shape, readers, roles, num_checkpoints)
            )
            for start, stop in _row_slices(shape, len(inputs)):
                stacked, base, raw = _read_slice(name, shape, start, stop, readers, roles, num_checkpoints)
                # Methods that move agreeing slices too copy only where the base also agrees (nothing moved).
                agreed = merger.keeps_agreement or (len(raw) > num_checkpoints and _all_equal(raw))
                if agreed and _all_equal(raw[:num_checkpoints]):
                    merged = raw[0]  # every input that matters agrees: copy bit for bit
                else:
                    merged = merger.merge_rows(stacked, base, statistics)
                writer.write(name, merged.to(torch_dtype(dtype_name)))


def _row_slices(shape: list[int], num_inputs: int) -> Iterator[tuple[int | None, int | None]]:
    """Row ranges of at most SLICE_BUDGET_BYTES for all inputs together (float32); (None, None) for a 0-d tensor."""
    if not shape:
        yield None, None
        return
    row_bytes = max(1, num_inputs * 4 * math.prod(shape[1:]))
    rows_per_slice = max(1, SLICE_BUDGET_BYTES // row_bytes)
    for start in range(0, shape[0], rows_per_slice):
        yield start, min(start + rows_per_slice, shape[0])


def _read_slices(
    name: str, shape: list[int], readers: list[RowReader], roles: list[str], num_checkpoints: int
) -> Iterator[tuple[Tensor, Tensor | None]]:
    """Every row slice of a tensor as (stacked checkpoints, base) in the compute dtype (a statistics pass)."""
    for start, stop in _row_slices(shape, len(readers)):
        yield _read_slice(name, shape, start, stop, readers, roles, num_checkpoints)[:2]


def _all_equal(tensors: list[Tensor]) -> bool:
    return all(t.dtype == tensors[0].dtype and torch.equal(t, tensors[0]) for t in tensors[1:])


def _read_slice(
    name: str,
    shape: list[int],
    start: int | None,
    stop: int | None,
    readers: list[RowReader],
    roles: list[str],
    num_checkpoints: int,
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """Read one row slice of every input.

    Returns:
        The checkpoints' rows stacked in the compute dtype, shape ``(K, rows, ...)`` (0-d tensors as one row of one
        element); the base's rows in the compute dtype (or None); and every input's rows in its stored dtype.
    """
    dtype = compute_dtype(readers[0].dtype(name))
    rows_shape = [stop - start, *shape[1:]] if shape else [1]
    stacked = torch.empty((num_checkpoints, *rows_shape), dtype=dtype)
    converted, raw = [], []
    for index, reader in enumerate(readers):
        target = stacked[index] if index < num_checkpoints else torch.empty(rows_shape, dtype=dtype)
        if reader.dtype(name) == dtype:
            values = reader.read(name, start, stop, out=target)  # straight into the stack: no conversion, no copy
        else:
            values = reader.read(name, start, stop)
            target.copy_(values.reshape(rows_shape))
        raw.append(values)
        converted.append(target)
    # A sum is finite unless an input is not (or the sum overflows): one cheap pass, a closer look only on alarm.
    if not all(torch.isfinite(tensor.sum()) for tensor in (stacked, *converted[num_checkpoints:])):
        for role, tensor in zip(roles, converted):
            if not torch.isfinite(tensor).all():
                raise ValueError(f"Tensor {name!r} of {role} holds NaN or infinite values; refusing to merge it.")
    base = converted[num_checkpoints] if len(converted) > num_checkpoints else None
    return stacked, base, raw


def _copy_tensor(
    name: str, shape: list[int], readers: list[RowReader], roles: list[str], writer: SafetensorsStreamWriter
) -> None:
    """Copy an integer/bool tensor from checkpoints[0]; warn if the checkpoints disagree on it."""
    for start, stop in _row_slices(shape, 2):
        values = readers[0].read(name, start, stop)
        for role, reader in zip(roles[1:], readers[1:]):
            if role == "base" or name not in reader.tensor_files:
                continue  # the base's buffers are not used; a checkpoint may lack an integer buffer (position_ids)
            if not torch.equal(reader.read(name, start, stop), values):
                logger.warning(
                    f"Integer tensor {name!r} differs between checkpoints[0] and {role}; copying checkpoints[0]'s."
                )
                break
        writer.write(name, values)
