"""Merging saved sentence-transformers folders: streaming I/O, carried-over modules, atomic writes, refusals."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Dense, Normalize, Pooling
from tiny_model import build_tiny_model

from codiemb_st.merging import DeltaSoup, ModelSoup, TaskArithmetic, streaming_merge
from codiemb_st.merging.safetensors_stream import RowReader, SafetensorsStreamWriter

WEIGHT_FILES = ("model.safetensors", "2_Dense/model.safetensors")


@functools.cache
def _transformer(hidden_size: int):
    # Built once: the tiny WordPiece tokenizer is not reproducible between builds (its vocabulary size varies),
    # and checkpoints of one base must share the vocabulary.
    return build_tiny_model(seed=0, hidden_size=hidden_size)[0]


def build_model(
    noise_seed: int | None = None,
    pooling_mode: str = "mean",
    hidden_size: int = 32,
    dense: bool = True,
    dense_features: int = 16,
):
    """Transformer + Pooling + Dense + Normalize; ``noise_seed`` fine-tunes it by a seeded perturbation."""
    modules = [copy.deepcopy(_transformer(hidden_size)), Pooling(hidden_size, pooling_mode=pooling_mode)]
    if dense:
        torch.manual_seed(1)
        modules.append(Dense(hidden_size, dense_features, activation_function=torch.nn.Tanh()))
    modules.append(Normalize())
    model = SentenceTransformer(modules=modules, device="cpu")
    model.prompts = {"query": "query: ", "document": ""}
    if noise_seed is not None:
        generator = torch.Generator().manual_seed(noise_seed)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "LayerNorm" in name:
                    continue  # untouched by every checkpoint: must be copied bit for bit
                if "layer.1.output" in name and noise_seed != 1:
                    continue  # moved by one checkpoint only
                parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("merging")
    build_model().save(str(root / "base"))
    for seed in (1, 2, 3):
        build_model(noise_seed=seed).save(str(root / f"ckpt{seed}"))
    return root


def checkpoint_paths(root: Path) -> list[Path]:
    return [root / f"ckpt{seed}" for seed in (1, 2, 3)]


def tensors(folder: Path, file: str = "model.safetensors") -> dict[str, torch.Tensor]:
    return load_file(str(folder / file))


def folder_hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in folder.rglob("*")
        if p.is_file()
    }


def reference_merge(method, checkpoints: list[Path], base: Path | None, file: str) -> dict[str, torch.Tensor]:
    """The pure per-tensor function applied to fully loaded state dicts (independent of the streaming path)."""
    states = [tensors(c, file) for c in checkpoints]
    base_state = tensors(base, file) if base is not None else None
    return {
        name: method.merge_tensors([s[name] for s in states], base_state[name] if base_state else None)
        for name in states[0]
    }


@pytest.mark.parametrize(
    "method", [DeltaSoup(), DeltaSoup(power=2, granularity="row"), DeltaSoup(granularity="tensor", temperature=0.5)]
)
def test_merged_folder_loads_encodes_and_matches_the_math(folders, tmp_path, monkeypatch, method):
    # A tiny slice budget forces every tensor through several row slices (and two passes for tensor granularity).
    monkeypatch.setattr(streaming_merge, "SLICE_BUDGET_BYTES", 4096)
    checkpoints = checkpoint_paths(folders)
    out = method.merge_to_folder(
        checkpoints, tmp_path / "merged", base_model=folders / "base", show_progress_bar=False
    )
    assert out == tmp_path / "merged"

    base_state = tensors(folders / "base")
    for file in WEIGHT_FILES:
        merged = tensors(out, file)
        expected = reference_merge(method, checkpoints, folders / "base", file)
        assert merged.keys() == expected.keys() == tensors(checkpoints[0], file).keys()
        for name, value in expected.items():
            assert merged[name].dtype == value.dtype
            torch.testing.assert_close(merged[name], value, atol=1e-6, rtol=1e-6, msg=name)
    layer_norms = [name for name in base_state if "LayerNorm" in name]
    assert layer_norms and all(torch.equal(tensors(out)[name], base_state[name]) for name in layer_norms)
    moved = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(tensors(out)[moved], base_state[moved])
    with safe_open(str(out / "model.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}

    # module folders and configuration carried over from checkpoints[0]; its model card is not (the merge's replaces it)
    for name in ("modules.json", "1_Pooling/config.json", "2_Dense/config.json", "config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (checkpoints[0] / name).read_bytes(), name
    assert (out / "3_Normalize").is_dir()
    assert json.loads((out / "config_sentence_transformers.json").read_text())["prompts"]["query"] == "query: "
    assert "DeltaSoup merge of 3" in (out / "README.md").read_text()
    record = json.loads((out / "merge_config.json").read_text())
    assert {key: record[key] for key in ("method", "parameters", "num_checkpoints")} == {
        "method": "DeltaSoup",
        "parameters": method.get_config_dict(),
        "num_checkpoints": 3,
    }
    assert [entry["path"] for entry in record["checkpoints"]] == [str(c) for c in checkpoints]
    assert record["base_model"]["path"] == str(folders / "base") and record["base_model"]["used"]

    model = SentenceTransformer(str(out), device="cpu")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling", "Dense", "Normalize"]
    embeddings = model.encode(["a man is playing a guitar", "the weather is sunny"], convert_to_tensor=True)
    assert embeddings.shape == (2, 16) and torch.isfinite(embeddings).all()
    torch.testing.assert_close(embeddings.norm(dim=1), torch.ones(2))
    assert model.prompts["query"] == "query: "


def test_merge_returns_the_model_and_inputs_are_untouched(folders, tmp_path):
    inputs = [*checkpoint_paths(folders), folders / "base"]
    before = {str(p): folder_hashes(p) for p in inputs}
    outside = set(tmp_path.parent.iterdir())
    model = DeltaSoup().merge(checkpoint_paths(folders), base_model=folders / "base", show_progress_bar=False)
    assert {str(p): folder_hashes(p) for p in inputs} == before
    assert set(tmp_path.parent.iterdir()) == outside

    saved = DeltaSoup().merge(
        checkpoint_paths(folders), base_model=folders / "base", output_path=tmp_path / "out", show_progress_bar=False
    )
    sentences = ["retrieval finds relevant passages", "今天天气很好"]
    assert torch.equal(
        model.encode(sentences, convert_to_tensor=True), saved.encode(sentences, convert_to_tensor=True)
    )
    assert {str(p): folder_hashes(p) for p in inputs} == before


def test_sentence_transformer_objects_as_inputs(folders, tmp_path):
    objects = [build_model(noise_seed=seed) for seed in (1, 2, 3)]
    from_objects = DeltaSoup().merge_to_folder(
        objects, tmp_path / "a", base_model=build_model(), show_progress_bar=False
    )
    from_folders = DeltaSoup().merge_to_folder(
        checkpoint_paths(folders), tmp_path / "b", base_model=folders / "base", show_progress_bar=False
    )
    for file in WEIGHT_FILES:
        a, b = tensors(from_objects, file), tensors(from_folders, file)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_baselines_through_folders(folders, tmp_path):
    checkpoints = checkpoint_paths(folders)
    soup = ModelSoup().merge_to_folder(checkpoints, tmp_path / "soup", show_progress_bar=False)
    arithmetic = TaskArithmetic(scale=0.3).merge_to_folder(
        checkpoints, tmp_path / "ta", base_model=folders / "base", show_progress_bar=False
    )
    for file in WEIGHT_FILES:
        states = [tensors(c, file) for c in checkpoints]
        base = tensors(folders / "base", file)
        for name in base:
            mean = torch.stack([s[name] for s in states]).mean(0)
            torch.testing.assert_close(tensors(soup, file)[name], mean, atol=1e-7, rtol=1e-6)
            task_sum = base[name] + 0.3 * sum(s[name] - base[name] for s in states)
            torch.testing.assert_close(tensors(arithmetic, file)[name], task_sum, atol=1e-7, rtol=1e-6)
    # ModelSoup accepts a base (so methods can be swapped in a loop) but does not use it
    with_base = ModelSoup().merge_to_folder(
        checkpoints, tmp_path / "soup2", base_model=folders / "base", show_progress_bar=False
    )
    assert (with_base / "model.safetensors").read_bytes() == (soup / "model.safetensors").read_bytes()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_checkpoints_keep_their_dtype(tmp_path, dtype):
    build_model().save(str(tmp_path / "base"))  # the base stays float32
    checkpoints = []
    for seed in (1, 2):
        build_model(noise_seed=seed).to(dtype).save(str(tmp_path / f"ckpt{seed}"))
        checkpoints.append(tmp_path / f"ckpt{seed}")
    model = DeltaSoup().merge(
        checkpoints, base_model=tmp_path / "base", output_path=tmp_path / "out", show_progress_bar=False
    )
    for file in WEIGHT_FILES:
        merged = tensors(tmp_path / "out", file)
        expected = reference_merge(DeltaSoup(), checkpoints, tmp_path / "base", file)
        for name, value in expected.items():
            assert merged[name].dtype == dtype
            assert torch.equal(merged[name], value), name
    assert next(model.parameters()).dtype == dtype
    assert torch.isfinite(model.encode(["a query"], convert_to_tensor=True).float()).all()


def test_interrupted_write_leaves_no_folder_at_the_target(folders, tmp_path, monkeypatch):
    calls = {"n": 0}
    original = SafetensorsStreamWriter.write

    def failing_write(self, name, data):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # Ctrl-C half-way through the first weight file
        original(self, name, data)

    monkeypatch.setattr(SafetensorsStreamWriter, "write", failing_write)
    parent = tmp_path / "models"
    parent.mkdir()
    with pytest.raises(KeyboardInterrupt):
        DeltaSoup().merge_to_folder(checkpoint_paths(folders), parent / "merged", base_model=folders / "base")
    assert calls["n"] == 10
    assert list(parent.iterdir()) == []  # neither the target nor the temporary folder


def test_only_bounded_slices_are_read(folders, tmp_path, monkeypatch):
    budget = 8192
    monkeypatch.setattr(streaming_merge, "SLICE_BUDGET_BYTES", budget)
    sizes = []
    original = RowReader.read

    def recording_read(self, name, start=None, stop=None, out=None):
        tensor = original(self, name, start, stop, out)
        sizes.append(tensor.numel() * 4)
        return tensor

    monkeypatch.setattr(RowReader, "read", recording_read)
    DeltaSoup().merge_to_folder(
        checkpoint_paths(folders), tmp_path / "m", base_model=folders / "base", show_progress_bar=False
    )
    # 4 inputs share the budget; the largest tensor (the 290 x 32 word embeddings = 37 KB) is read in slices
    assert max(sizes) <= budget // 4
    assert sum(sizes) >= 4 * sum(t.numel() * 4 for t in tensors(folders / "base").values())


def test_integer_tensors_are_copied_from_the_first_checkpoint(folders, tmp_path, caplog):
    copies = []
    for index, source in enumerate([*checkpoint_paths(folders)[:2], folders / "base"]):
        target = tmp_path / source.name
        shutil.copytree(source, target)
        state = tensors(target)
        state["extra.counts"] = torch.tensor([[3, 1], [4, 1]], dtype=torch.int64) + index
        state["extra.flags"] = torch.tensor([True, False, index == 0])
        save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})
        copies.append(target)
    with caplog.at_level(logging.WARNING):
        out = DeltaSoup().merge_to_folder(copies[:2], tmp_path / "out", base_model=copies[2], show_progress_bar=False)
    merged, first = tensors(out), tensors(copies[0])
    assert merged["extra.counts"].dtype == torch.int64 and torch.equal(merged["extra.counts"], first["extra.counts"])
    assert torch.equal(merged["extra.flags"], first["extra.flags"])
    assert "extra.counts" in caplog.text and "differs" in caplog.text


def test_sharded_checkpoint_is_read(folders, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(checkpoint_paths(folders)[0], sharded)
    state = tensors(sharded)
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    half = len(names) // 2
    weight_map = {}
    for index, part in enumerate((names[:half], names[half:])):
        shard = f"model-0000{index + 1}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, str(sharded / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    others = checkpoint_paths(folders)[1:]
    a = DeltaSoup().merge_to_folder(
        [sharded, *others], tmp_path / "a", base_model=folders / "base", show_progress_bar=False
    )
    b = DeltaSoup().merge_to_folder(checkpoint_paths(folders), tmp_path / "b", base_model=folders / "base")
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert not list(a.glob("model-*")) and not (a / "model.safetensors.index.json").exists()


# ---------------------------------------------------------------- refusals


def test_refuses_bad_checkpoint_and_base_arguments(folders, tmp_path):
    checkpoints = checkpoint_paths(folders)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="at least one"):
        DeltaSoup().merge_to_folder([], out, base_model=folders / "base")
    with pytest.raises(TypeError, match="list"):
        DeltaSoup().merge_to_folder(str(checkpoints[0]), out, base_model=folders / "base")
    with pytest.raises(TypeError, match=r"checkpoints\[1\]"):
        DeltaSoup().merge_to_folder([checkpoints[0], 3], out, base_model=folders / "base")
    for method in (DeltaSoup(), TaskArithmetic()):
        with pytest.raises(ValueError, match="needs base"):
            method.merge_to_folder(checkpoints, out)
    with pytest.raises(ValueError, match="base .* is not a folder"):
        DeltaSoup().merge_to_folder(checkpoints, out, base_model=tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="no modules.json"):
        DeltaSoup().merge_to_folder([tmp_path / "plain"], out, base_model=folders / "base")
    assert not out.exists()


def test_refuses_unsafe_output_paths(folders, tmp_path):
    checkpoints = checkpoint_paths(folders)
    for target in (checkpoints[1], checkpoints[0] / "merged", folders / "base" / "1_Pooling" / "x"):
        with pytest.raises(ValueError, match="inside, the input"):
            DeltaSoup().merge_to_folder(checkpoints, target, base_model=folders / "base")
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="already exists"):
        DeltaSoup().merge_to_folder(checkpoints, existing, base_model=folders / "base")
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()  # an empty folder prepared by the caller is fine
    DeltaSoup().merge_to_folder(checkpoints, empty, base_model=folders / "base", show_progress_bar=False)
    assert (empty / "model.safetensors").is_file()


def _with_dense_activation(activation: torch.nn.Module):
    model = build_model(noise_seed=1)
    model[2].activation_function = activation
    return model


@pytest.mark.parametrize(
    ("other", "message"),
    [
        (lambda: build_model(noise_seed=1, hidden_size=48), "hidden_size"),
        (lambda: build_model(noise_seed=1, dense=False), "module"),
        (
            # A Dense activation is part of its weights' computation: refused. (A Pooling difference is a setting,
            # taken from checkpoints[0] with a warning: tests/merging/test_merging_compatibility.py.)
            lambda: _with_dense_activation(torch.nn.Identity()),
            r"Module 2 \(Dense\) .* different configuration in config.json .*activation_function",
        ),
    ],
    ids=["architecture", "module-list", "module-config"],
)
def test_refuses_incompatible_checkpoints(folders, tmp_path, other, message):
    other().save(str(tmp_path / "other"))
    with pytest.raises(ValueError, match=message):
        DeltaSoup().merge_to_folder(
            [checkpoint_paths(folders)[0], tmp_path / "other"], tmp_path / "out", base_model=folders / "base"
        )
    assert not (tmp_path / "out").exists()


def test_refuses_an_incompatible_base(folders, tmp_path):
    build_model(dense_features=24).save(str(tmp_path / "wider"))
    with pytest.raises(ValueError, match=r"'linear.bias' has shape \[24\] in base and \[16\] in checkpoints\[0\]"):
        DeltaSoup().merge_to_folder(checkpoint_paths(folders), tmp_path / "out", base_model=tmp_path / "wider")
    build_model(hidden_size=48).save(str(tmp_path / "base48"))  # another tokenizer, too
    with pytest.raises(ValueError, match="vocabulary|shape"):
        DeltaSoup().merge_to_folder(checkpoint_paths(folders), tmp_path / "out", base_model=tmp_path / "base48")
    assert not (tmp_path / "out").exists()


def test_base_may_hold_extra_tensors_but_not_lack_any(folders, tmp_path):
    # Older transformers saved the `embeddings.position_ids` buffer; models fine-tuned from such a base do not.
    with_buffer, lacking = tmp_path / "with_buffer", tmp_path / "lacking"
    for target in (with_buffer, lacking):
        shutil.copytree(folders / "base", target)
    state = tensors(with_buffer)
    state["embeddings.position_ids"] = torch.arange(8, dtype=torch.int64)[None]
    save_file(state, str(with_buffer / "model.safetensors"), metadata={"format": "pt"})
    expected = DeltaSoup().merge_to_folder(
        checkpoint_paths(folders), tmp_path / "plain", base_model=folders / "base", show_progress_bar=False
    )
    merged = DeltaSoup().merge_to_folder(
        checkpoint_paths(folders), tmp_path / "merged", base_model=with_buffer, show_progress_bar=False
    )
    assert tensors(merged).keys() == tensors(expected).keys()
    assert all(torch.equal(tensors(merged)[k], v) for k, v in tensors(expected).items())

    state = tensors(lacking)
    del state[next(name for name in state if name.endswith("attention.self.query.weight"))]
    save_file(state, str(lacking / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"base has different tensor names .* \(1 missing, 0 extra\)"):
        DeltaSoup().merge_to_folder(checkpoint_paths(folders), tmp_path / "out", base_model=lacking)
    # A checkpoint with an extra integer buffer holds no extra weights (the packaged all-MiniLM-L6-v2, saved by an
    # older transformers, has position_ids): merged, with checkpoints[0]'s tensor list.
    merged = ModelSoup().merge_to_folder(
        [checkpoint_paths(folders)[0], with_buffer], tmp_path / "out2", show_progress_bar=False
    )
    assert tensors(merged).keys() == tensors(checkpoint_paths(folders)[0]).keys()
    # An extra weight is still refused: the merged model takes checkpoints[0]'s tensor list.
    extra_weight = tmp_path / "extra_weight"
    shutil.copytree(folders / "base", extra_weight)
    state = tensors(extra_weight)
    state["pooler.extra.weight"] = torch.ones(2, 2)
    save_file(state, str(extra_weight / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"different tensor names .*extra \['pooler.extra.weight'\]"):
        DeltaSoup().merge_to_folder(
            [checkpoint_paths(folders)[0], extra_weight], tmp_path / "out3", base_model=folders / "base"
        )


def test_refuses_non_finite_weights(folders, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint_paths(folders)[1], broken)
    state = tensors(broken, "2_Dense/model.safetensors")
    state["linear.weight"][3, 2] = float("nan")
    save_file(state, str(broken / "2_Dense" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"linear.weight.*checkpoints\[1\].*NaN"):
        DeltaSoup().merge_to_folder(
            [checkpoint_paths(folders)[0], broken],
            tmp_path / "out",
            base_model=folders / "base",
            show_progress_bar=False,
        )
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]  # temporary folder removed


def test_refuses_weights_that_cannot_be_streamed(folders, tmp_path):
    build_model(noise_seed=1).save(str(tmp_path / "bin"), safe_serialization=False)  # Dense -> pytorch_model.bin
    with pytest.raises(ValueError, match="cannot be streamed.*save"):
        DeltaSoup().merge_to_folder([tmp_path / "bin"], tmp_path / "out", base_model=folders / "base")
