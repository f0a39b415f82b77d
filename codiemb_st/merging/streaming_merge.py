"""The streaming I/O of a merge: read every input tensor by tensor in row slices, write the output folder atomically.

It knows no merge method. For every floating-point tensor it hands a :class:`StreamedTensor` (the tensor of every
input, readable in row slices, as often as needed) to the method's driver,
:meth:`~codiemb_st.merging.base.MergeMethod.merge_streamed`, and writes the slices it returns.

What the merged folder contains:

- Every safetensors weight file of ``checkpoints[0]`` (the Transformer's ``model.safetensors``, a Dense module's, ...;
  a sharded model becomes one ``model.safetensors``), with every tensor merged by the method. Floating-point tensors
  are merged in float32 (float64 for float64 weights) and cast back to the dtype of ``checkpoints[0]``. Integer and
  bool tensors, and row slices on which all inputs agree, are copied bit for bit from ``checkpoints[0]``.
- Every other file of ``checkpoints[0]`` (modules.json, config_sentence_transformers.json with its prompts,
  Pooling/Dense/Normalize configurations, config.json, tokenizer files), copied as is: the checkpoints must agree in
  architecture, module types and tensors, while settings (Pooling, prompts, incidental config.json keys) may differ
  and are taken from ``checkpoints[0]`` with a warning (:mod:`~codiemb_st.merging.compatibility`). Not copied:
  README.md (the model card of one checkpoint does not describe the merge; :mod:`~codiemb_st.merging.model_card`
  writes the merge's), weights in other formats (.bin, .pt, ...) and ONNX/OpenVINO exports, which would be stale. A
  ``merge_config.json`` records the method, its parameters and every input (path and a SHA-256 of its weight
  files), the base included.
- For LoRA adapter checkpoints (a Transformer folder with ``adapter_config.json`` + ``adapter_model.safetensors``,
  see :mod:`codiemb_st.merging.adapters`): the weights are read as base + scaling · B A, the output holds the full
  weights and the base's ``config.json`` instead of the adapter files, so it loads without peft.

Memory: tensors are read in row slices of at most :data:`SLICE_BUDGET_BYTES` (all inputs together, in the compute
dtype), merged, and appended to the output file, so peak memory is a few slices, whatever the number and size of the
inputs. Methods whose weights depend on the whole tensor (DeltaSoup with ``granularity="tensor"`` or ``rescale``,
ModelStock, TIES, SLERP/MultiSLERP's Gram matrix) read each tensor once per statistics pass (one, two for TIES's
exact top-k thresholds on float32 weights), then once to merge.

Atomicity: the folder is written to a hidden temporary folder next to ``output_path``
(``.<name>.<pid>.<random>.partial``) and renamed into place only when complete; on any error (or Ctrl-C) the
temporary folder is removed and nothing appears at ``output_path``. A process killed outright (``kill -9``, a crash
of the machine) can leave the hidden temporary folder behind, never a partial ``output_path``; the next merge into
the same ``output_path`` removes such a folder once its process is gone (with a warning).
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from codiemb_st._compat import SentenceTransformer
from codiemb_st.merging.adapters import AdapterRowReader
from codiemb_st.merging.model_folder import EXPORT_FOLDERS, UNMERGEABLE_WEIGHT_SUFFIXES, ModelFolder, WeightFile
from codiemb_st.merging.safetensors_stream import RowReader, SafetensorsStreamWriter, is_float_dtype, torch_dtype
from codiemb_st.merging.tensor_math import compute_dtype

logger = logging.getLogger(__name__)

#: Upper bound on the bytes of one row slice of all inputs together, in the compute dtype. The merge math needs a few
#: times this (deltas, scores), so the working memory stays in the tens of MB for any model. Measured on an
#: mpnet-base-sized merge (1 thread): 8 MiB was about 2x faster than 32 MiB (smaller buffers are reused by the
#: allocator and stay in cache) and no slower than 2-4 MiB (fewer Python round trips).
SLICE_BUDGET_BYTES = 8 * 2**20

ModelInput = str | Path | SentenceTransformer


@dataclass
class RowSlice:
    """One row slice of a tensor of every input.

    Attributes:
        checkpoints: The checkpoints' rows stacked in the compute dtype, shape ``(K, rows, ...)`` (0-d tensors as one
            row of one element): a scratch buffer the merge may overwrite.
        base: The base's rows in the compute dtype, or None when the method does not read the base.
        stored: Every input's rows (checkpoints, then the base) in its stored dtype, for bit-exact copies.
    """

    checkpoints: Tensor
    base: Tensor | None
    stored: list[Tensor]


@dataclass
class StreamedTensor:
    """One floating-point tensor of every input, read from disk in row slices each time :meth:`slices` is called.

    Attributes:
        module_index: The index of the module (``modules.json``) whose weight file holds it.
        name: The tensor's name in that file.
        shape: Its shape.
        num_checkpoints: K; an input after the K checkpoints is the base.
    """

    module_index: int
    name: str
    shape: list[int]
    num_checkpoints: int
    readers: list[RowReader | AdapterRowReader]
    roles: list[str]

    def slices(self) -> Iterator[RowSlice]:
        """Every row slice, in order (a fresh read of the files)."""
        for start, stop in row_slices(self.shape, len(self.readers)):
            yield read_slice(self.name, self.shape, start, stop, self.readers, self.roles, self.num_checkpoints)

    def stacked_slices(self) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Every row slice as ``(checkpoints, base)``: one statistics pass."""
        for rows in self.slices():
            yield rows.checkpoints, rows.base


#: The per-tensor merge the I/O calls: the merged row slices of one tensor, in order.
TensorMerge = Callable[[StreamedTensor], Iterator[Tensor]]


def stream_weight_file(
    inputs: list[ModelFolder],
    key: tuple[int, str],
    target: Path,
    merge_tensor: TensorMerge,
    num_checkpoints: int,
    show_progress_bar: bool,
) -> None:
    """Merge one logical weight file of every input into ``target``, tensor by tensor.

    Args:
        inputs: The checkpoints' folders, then the base's when the method reads it.
        key: The weight file (module index, path inside the module folder).
        target: The safetensors file to write.
        merge_tensor: Called once per floating-point tensor with its :class:`StreamedTensor`; returns the merged row
            slices (:meth:`~codiemb_st.merging.base.MergeMethod.merge_streamed`).
        num_checkpoints: K.
        show_progress_bar: Show a progress bar over the file's tensors.
    """
    template: WeightFile = inputs[0].weight_files[key]
    roles = [folder.role for folder in inputs]
    with ExitStack() as stack:
        readers = [stack.enter_context(folder.row_reader(key)) for folder in inputs]
        writer = stack.enter_context(SafetensorsStreamWriter(target, template.specs, template.metadata))
        description = f"Merging {inputs[0].module_class(key[0])} ({key[1]})"
        for name in tqdm(template.specs, desc=description, unit="tensor", disable=not show_progress_bar):
            dtype_name, shape = template.specs[name]
            if not is_float_dtype(dtype_name):
                copy_tensor(name, shape, readers, roles, writer)
                continue
            tensor = StreamedTensor(key[0], name, shape, num_checkpoints, readers, roles)
            for merged in merge_tensor(tensor):
                writer.write(name, merged.to(torch_dtype(dtype_name)))


def row_slices(shape: list[int], num_inputs: int) -> Iterator[tuple[int | None, int | None]]:
    """Row ranges of at most SLICE_BUDGET_BYTES for all inputs together (float32); (None, None) for a 0-d tensor."""
    if not shape:
        yield None, None
        return
    row_bytes = max(1, num_inputs * 4 * math.prod(shape[1:]))
    rows_per_slice = max(1, SLICE_BUDGET_BYTES // row_bytes)
    for start in range(0, shape[0], rows_per_slice):
        yield start, min(start + rows_per_slice, shape[0])


def read_slice(
    name: str,
    shape: list[int],
    start: int | None,
    stop: int | None,
    readers: list[RowReader | AdapterRowReader],
    roles: list[str],
    num_checkpoints: int,
) -> RowSlice:
    """Read one row slice of every input (see :class:`RowSlice`); refuse NaN or infinite values, naming the input."""
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
    return RowSlice(stacked, base, raw)


def copy_tensor(
    name: str,
    shape: list[int],
    readers: list[RowReader | AdapterRowReader],
    roles: list[str],
    writer: SafetensorsStreamWriter,
) -> None:
    """Copy an integer/bool tensor from checkpoints[0]; warn if the checkpoints disagree on it."""
    for start, stop in row_slices(shape, 2):
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


def distinct_checkpoints(checkpoints: Sequence[ModelInput]) -> int:
    """How many different checkpoints: folders counted by resolved path, model objects by identity."""
    return len({id(c) if isinstance(c, SentenceTransformer) else str(Path(c).resolve()) for c in checkpoints})


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


def make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return the ones created, deepest first."""
    missing = []
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            break
        missing.append(candidate)
    folder.mkdir(parents=True, exist_ok=True)
    return missing


def remove_created(folders: list[Path]) -> None:
    """Remove the folders :func:`make_parents` created, deepest first, as long as they are empty."""
    for folder in folders:  # deepest first; stops at the first folder something else wrote into
        try:
            folder.rmdir()
        except OSError:
            break


def check_checkpoints_argument(checkpoints: Sequence[ModelInput]) -> list[ModelInput]:
    """``checkpoints`` as a list, refusing a single path or model, an empty list and anything but paths and models."""
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
def as_folders(checkpoints: list[ModelInput], base: ModelInput | None) -> Iterator[tuple[list[Path], Path | None]]:
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


def copy_non_weight_files(template: ModelFolder, destination: Path) -> None:
    """Copy every file of ``template`` but its weights, its card and stale exports (see the module docstring)."""
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


def input_record(given: ModelInput | None, folder: ModelFolder) -> dict[str, Any]:
    """``{"path", "weights_sha256"}`` of one input; the path is None for a SentenceTransformer object (saved to a
    temporary folder for the merge, so only its weights' hash identifies it)."""
    path = None if isinstance(given, SentenceTransformer) else str(Path(given).absolute())
    return {"path": path, "weights_sha256": folder.weights_sha256()}


__all__ = [
    "SLICE_BUDGET_BYTES",
    "ModelInput",
    "RowSlice",
    "StreamedTensor",
    "TensorMerge",
    "as_folders",
    "check_checkpoints_argument",
    "check_output_path",
    "checkpoint_inputs",
    "copy_non_weight_files",
    "copy_tensor",
    "distinct_checkpoints",
    "glob_escape",
    "input_record",
    "make_parents",
    "read_slice",
    "remove_created",
    "remove_stale_work_folders",
    "row_slices",
    "stream_weight_file",
    "work_folder_prefix",
]
