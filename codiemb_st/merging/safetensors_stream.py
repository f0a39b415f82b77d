"""Read safetensors tensors slice by slice and write a safetensors file tensor by tensor, with bounded memory.

``safetensors.safe_open`` memory-maps the file: every page it touches stays resident (and counts towards the
process' memory) until the file is closed, and page faults make it slower than plain reads for a single sequential
pass. :class:`RowReader` instead reads the byte range of the requested rows with ``readinto``, straight into the
caller's buffer, so reading K + 1 models costs a few slices of memory, not K + 1 models. (The files' headers are
validated with ``safe_open`` when a model folder is opened.)

``safetensors`` can only save a complete in-memory dict of tensors. :class:`SafetensorsStreamWriter` writes the same
format (an 8-byte little-endian header length, a JSON header with dtype, shape and byte offsets of every tensor, padded
with spaces to 8 bytes, then the raw little-endian data in header order) from slices as they are produced, so a merged
model never has to be held in memory.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

import torch
from torch import Tensor

#: safetensors dtype strings -> torch dtypes (the ones torch can hold).
SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def torch_dtype(safetensors_dtype: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype string ("F32" -> torch.float32); ValueError for one torch lacks."""
    if safetensors_dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"Unsupported safetensors dtype {safetensors_dtype!r}.")
    return SAFETENSORS_DTYPES[safetensors_dtype]


def is_float_dtype(safetensors_dtype: str) -> bool:
    """Whether a safetensors dtype string ("F32", "BF16", "I64", ...) is a floating-point type (merged, not copied)."""
    return safetensors_dtype.startswith("F") or safetensors_dtype == "BF16"


class RowReader:
    """Reads row ranges of tensors from one or more safetensors files with plain file reads (no memory map).

    Args:
        tensor_files: Tensor name -> the safetensors file holding it.
    """

    def __init__(self, tensor_files: dict[str, Path]) -> None:
        self.tensor_files = tensor_files
        self._files: dict[Path, BinaryIO] = {}
        self._entries: dict[str, tuple[torch.dtype, list[int], int]] = {}  # dtype, shape, absolute byte offset

    def _open(self, path: Path) -> None:
        file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed in close()
        self._files[path] = file
        (header_size,) = struct.unpack("<Q", file.read(8))
        header = json.loads(file.read(header_size))
        header.pop("__metadata__", None)
        for name, entry in header.items():
            if self.tensor_files.get(name) == path:
                self._entries[name] = (
                    torch_dtype(entry["dtype"]),
                    entry["shape"],
                    8 + header_size + entry["data_offsets"][0],
                )

    def dtype(self, name: str) -> torch.dtype:
        if name not in self._entries:
            self._open(self.tensor_files[name])
        return self._entries[name][0]

    def read(self, name: str, start: int | None = None, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Rows ``start:stop`` of tensor ``name`` (the whole tensor when both are None; 0-d tensors are read whole).

        With ``out`` (a contiguous tensor of the stored dtype and the number of elements of the rows), the bytes are
        read straight into it and it is returned with the rows' shape.
        """
        dtype = self.dtype(name)
        _, shape, offset = self._entries[name]
        row_numel = math.prod(shape[1:])
        if shape and (start is not None or stop is not None):
            start, stop = start or 0, shape[0] if stop is None else min(stop, shape[0])
            rows_shape = [stop - start, *shape[1:]]
            offset += start * row_numel * dtype.itemsize
        else:
            rows_shape = list(shape)
        numel = math.prod(rows_shape)
        if out is None:
            out = torch.empty(numel, dtype=dtype)
        elif out.dtype != dtype or out.numel() != numel or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of {numel} elements to read {name!r}.")
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        file = self._files[self.tensor_files[name]]
        file.seek(offset)
        done = 0
        while done < len(buffer):
            count = file.readinto(buffer[done:])
            if not count:
                raise ValueError(f"{self.tensor_files[name]} is truncated: tensor {name!r} is incomplete.")
            done += count
        return out.reshape(rows_shape)

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._entries.clear()

    def __enter__(self) -> RowReader:
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


class SafetensorsStreamWriter:
    """Writes a safetensors file whose tensors are known in advance, slice by slice, in the order of ``specs``.

    Args:
        path: The file to create.
        specs: Tensor name -> (safetensors dtype string, shape), in the order the tensors will be written.
        metadata: The file's ``__metadata__`` (string to string), e.g. ``{"format": "pt"}``.
    """

    def __init__(
        self, path: str | Path, specs: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None
    ) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("Writing safetensors needs a little-endian machine.")
        header: dict[str, object] = {}
        self._sizes: list[tuple[str, torch.dtype, int]] = []
        offset = 0
        for name, (dtype, shape) in specs.items():
            nbytes = math.prod(shape) * torch_dtype(dtype).itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self._sizes.append((name, torch_dtype(dtype), nbytes))
            offset += nbytes
        if metadata:
            header["__metadata__"] = metadata
        blob = json.dumps(header, separators=(",", ":")).encode("utf8")
        blob += b" " * (-len(blob) % 8)
        self.path = Path(path)
        self._file = open(self.path, "xb")  # noqa: SIM115 - closed in close()
        self._file.write(struct.pack("<Q", len(blob)))
        self._file.write(blob)
        self._index = 0
        self._written = 0

    def write(self, name: str, data: Tensor) -> None:
        """Append the next slice of tensor ``name`` (rows in order; its dtype must match the spec)."""
        if data.numel() == 0:
            return  # nothing to write (empty tensors take no bytes and are skipped automatically)
        if self._index >= len(self._sizes):
            raise ValueError(f"All tensors were already written; got more data for {name!r}.")
        expected_name, dtype, nbytes = self._sizes[self._index]
        if name != expected_name:
            raise ValueError(f"Expected data for tensor {expected_name!r}, got {name!r}.")
        if data.dtype != dtype:
            raise ValueError(f"Tensor {name!r} must be written as {dtype}, got {data.dtype}.")
        raw = data.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        if self._written + raw.nbytes > nbytes:
            raise ValueError(f"Too much data for tensor {name!r}: {self._written + raw.nbytes} > {nbytes} bytes.")
        self._file.write(raw.data)
        self._written += raw.nbytes
        self._advance()

    def _advance(self) -> None:
        # Move past the current tensor once complete (and past empty tensors, which take no bytes).
        while self._index < len(self._sizes) and self._written == self._sizes[self._index][2]:
            self._index += 1
            self._written = 0

    def close(self) -> None:
        """Close the file; raise ValueError if a tensor is incomplete (a writer bug, never a silent short file)."""
        self._advance()
        self._file.close()
        if self._index != len(self._sizes):
            name = self._sizes[self._index][0]
            raise ValueError(f"{self.path} is incomplete: tensor {name!r} and the ones after it were not written.")

    def __enter__(self) -> SafetensorsStreamWriter:
        self._advance()
        return self

    def __exit__(self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if exc_type is None:
            self.close()
        else:
            self._file.close()
