"""The streaming safetensors writer and slice reader, checked against the safetensors library itself."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from codiemb_st.merging.safetensors_stream import RowReader, SafetensorsStreamWriter

TENSORS = {
    "weight": torch.randn(7, 5, generator=torch.Generator().manual_seed(0)),
    "half": torch.randn(3, 4, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16),
    "fp16": torch.randn(5, generator=torch.Generator().manual_seed(2)).to(torch.float16),
    "flags": torch.tensor([True, False, True]),
    "counter": torch.tensor(42, dtype=torch.int64),
    "empty": torch.zeros(0, 3),
}
DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.bool: "BOOL", torch.int64: "I64"}


def specs(tensors):
    return {name: (DTYPES[t.dtype], list(t.shape)) for name, t in tensors.items()}


def test_streamed_file_is_read_back_by_safetensors(tmp_path):
    path = tmp_path / "streamed.safetensors"
    with SafetensorsStreamWriter(path, specs(TENSORS), metadata={"format": "pt"}) as writer:
        for name, tensor in TENSORS.items():
            if tensor.dim() == 0 or tensor.shape[0] == 0:
                writer.write(name, tensor)
            else:
                for start in range(0, tensor.shape[0], 2):  # in slices of two rows
                    writer.write(name, tensor[start : start + 2])
    loaded = load_file(str(path))
    assert loaded.keys() == TENSORS.keys()
    for name, tensor in TENSORS.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    assert header_size % 8 == 0  # padded like the safetensors library does


def test_writer_refuses_wrong_order_dtype_size_and_short_files(tmp_path):
    tensors = {"a": torch.ones(2, 2), "b": torch.ones(3)}
    with pytest.raises(ValueError, match="Expected data for tensor 'a'"):
        with SafetensorsStreamWriter(tmp_path / "1.safetensors", specs(tensors)) as writer:
            writer.write("b", tensors["b"])
    with pytest.raises(ValueError, match="must be written as torch.float32"):
        with SafetensorsStreamWriter(tmp_path / "2.safetensors", specs(tensors)) as writer:
            writer.write("a", tensors["a"].double())
    with pytest.raises(ValueError, match="Too much data"):
        with SafetensorsStreamWriter(tmp_path / "3.safetensors", specs(tensors)) as writer:
            writer.write("a", torch.ones(3, 2))
    with pytest.raises(ValueError, match="incomplete: tensor 'b'"):
        with SafetensorsStreamWriter(tmp_path / "4.safetensors", specs(tensors)) as writer:
            writer.write("a", tensors["a"])
    with pytest.raises(FileExistsError):
        SafetensorsStreamWriter(tmp_path / "4.safetensors", specs(tensors))


def test_row_reader_reads_row_ranges_into_buffers(tmp_path):
    tensors = {
        "x": torch.arange(40.0).reshape(10, 4),
        "h": torch.randn(3, 2).to(torch.bfloat16),
        "s": torch.tensor(3.5),
    }
    save_file({"x": tensors["x"], "s": tensors["s"]}, str(tmp_path / "a.safetensors"))
    save_file({"h": tensors["h"]}, str(tmp_path / "b.safetensors"))  # a second shard
    files = {"x": tmp_path / "a.safetensors", "s": tmp_path / "a.safetensors", "h": tmp_path / "b.safetensors"}
    with RowReader(files) as reader:
        rows = [reader.read("x", start, start + 3) for start in range(0, 10, 3)]
        assert [r.shape[0] for r in rows] == [3, 3, 3, 1]
        assert torch.equal(torch.cat(rows), tensors["x"])
        buffer = torch.empty(2, 4)
        assert reader.read("x", 5, 7, out=buffer).data_ptr() == buffer.data_ptr()
        assert torch.equal(buffer, tensors["x"][5:7])
        assert torch.equal(reader.read("s"), tensors["s"]) and reader.read("s").shape == ()
        assert reader.dtype("h") == torch.bfloat16 and torch.equal(reader.read("h", 1, 3), tensors["h"][1:3])
        with pytest.raises(ValueError, match="out must be"):
            reader.read("x", 0, 2, out=torch.empty(3, 4))

    data = (tmp_path / "a.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-20])
    with RowReader(dict.fromkeys(["x", "s"], tmp_path / "cut.safetensors")) as reader:
        with pytest.raises(ValueError, match="truncated"):
            reader.read("x")
