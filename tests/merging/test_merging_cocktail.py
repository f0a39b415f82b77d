"""CocktailSoup: weights from each candidate's loss on a few examples, against hand-computed loop references."""

from __future__ import annotations

import json
import math
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from sentence_transformers import SentenceTransformer

from codiemb_st import recipe
from codiemb_st.cli import main
from codiemb_st.losses import PearsonSpearmanLoss
from codiemb_st.merging import MERGE_METHODS, CocktailSoup

QUERIES = ["the quick brown fox jumps", "a man is playing a guitar", "stock markets fell sharply"]
POSITIVES = ["a fast fox leaps over a dog", "someone plays music on stage", "shares dropped after the news"]
NEGATIVES = ["the weather is sunny today", "children play football", "he drove to the office"]
STS_PAIRS = [  # scores below PearsonSpearmanLoss's MidNCE threshold (1.0): that term is 0, the rest is checked
    ("a man is playing a guitar", "a man plays the guitar", 0.9),
    ("a woman is slicing an onion", "a woman cuts an onion", 0.8),
    ("the weather is sunny", "stock markets fell", 0.1),
    ("children are playing football", "kids play in the park", 0.6),
]
QUERY_PROMPT, STS_PROMPT = "query: ", "similar: "


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf8")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from test_merging_folders import build_model

    root = tmp_path_factory.mktemp("cocktail")
    for name, seed in (("base", None), ("ckpt1", 1), ("ckpt2", 2), ("ckpt3", 3)):
        model = build_model(noise_seed=seed)
        # Prompts the models were "trained" with, excluded from mean pooling: scoring must use them the same way.
        recipe.use_instructions(model, query=QUERY_PROMPT, sts=STS_PROMPT)
        model.save(str(root / name))
    ir = _write_jsonl(
        root / "ir.jsonl",
        [{"query": q, "positives": [p], "negatives": [n]} for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES)],
    )
    sts = _write_jsonl(root / "sts.jsonl", [{"sentence1": a, "sentence2": b, "score": s} for a, b, s in STS_PAIRS])
    return root, ir, sts


def checkpoints(root: Path) -> list[Path]:
    return [root / f"ckpt{seed}" for seed in (1, 2, 3)]


def reference_ir_loss(model: SentenceTransformer, temperature: float = 0.02) -> float:
    """InfoNCE over the example set, by hand: each query against every positive and every hard negative."""
    q = model.encode(QUERIES, prompt=QUERY_PROMPT, convert_to_tensor=True)
    p = model.encode(POSITIVES, convert_to_tensor=True)  # the "document" prompt is ""
    n = model.encode(NEGATIVES, convert_to_tensor=True)
    cos = lambda a, b: float(torch.dot(a, b) / (a.norm() * b.norm()))  # noqa: E731
    total = 0.0
    for i in range(len(QUERIES)):
        logits = [cos(q[i], p[j]) / temperature for j in range(len(POSITIVES))]
        logits += [cos(q[i], n[j]) / temperature for j in range(len(NEGATIVES))]
        top = max(logits)
        total += -(logits[i] - top - math.log(sum(math.exp(x - top) for x in logits)))
    return total / len(QUERIES)


def reference_sts_loss(model: SentenceTransformer) -> float:
    """The STS loss's terms on embeddings computed by ``encode`` with the model's sts prompt (no MidNCE anchors)."""
    a = model.encode([x for x, _, _ in STS_PAIRS], prompt=STS_PROMPT, convert_to_tensor=True)
    b = model.encode([y for _, y, _ in STS_PAIRS], prompt=STS_PROMPT, convert_to_tensor=True)
    labels = torch.tensor([s for _, _, s in STS_PAIRS])
    return float(PearsonSpearmanLoss(model).compute_loss_from_embeddings([a, b], labels))


def reference_weights(losses: list[float], temperature: float) -> list[float]:
    exps = [math.exp(-loss / temperature) for loss in losses]
    return [e / sum(exps) for e in exps]


def reference_average(folders: list[Path], weights: list[float], file: str = "model.safetensors"):
    states = [load_file(str(folder / file)) for folder in folders]
    merged = {}
    for name in states[0]:
        value = torch.zeros_like(states[0][name], dtype=torch.float64)
        for weight, state in zip(weights, states):
            value += weight * state[name].double()
        merged[name] = value
    return merged


@pytest.mark.parametrize("files", [("ir",), ("sts",), ("ir", "sts")])
def test_weights_and_merged_tensors_equal_the_loop_references(inputs, tmp_path, files):
    root, ir, sts = inputs
    paths = [{"ir": ir, "sts": sts}[name] for name in files]
    soup = CocktailSoup(paths, temperature=0.7)
    out = soup.merge_to_folder(checkpoints(root), tmp_path / "m", show_progress_bar=False)

    losses = []
    for folder in checkpoints(root):
        model = SentenceTransformer(str(folder), device="cpu")
        own = [reference_ir_loss(model) if name == "ir" else reference_sts_loss(model) for name in files]
        losses.append(own)
    for fitted, expected in zip(soup.fitted.losses, losses):
        assert fitted == pytest.approx(expected, rel=1e-4, abs=1e-5)
    weights = reference_weights([sum(own) / len(own) for own in losses], 0.7)
    assert soup.fitted.weights == pytest.approx(weights, rel=1e-4)
    assert len(set(round(w, 4) for w in weights)) == 3  # the candidates really differ

    config = json.loads((out / "merge_config.json").read_text())
    assert config["method"] == "CocktailSoup" and config["parameters"]["weights"] == soup.fitted.weights
    for file in ("model.safetensors", "2_Dense/model.safetensors"):
        merged = load_file(str(out / file))
        expected = reference_average(checkpoints(root), soup.fitted.weights, file)
        for name, value in expected.items():
            torch.testing.assert_close(merged[name], value.float(), atol=1e-6, rtol=1e-6, msg=name)
    assert SentenceTransformer(str(out), device="cpu").prompts["query"] == QUERY_PROMPT


def test_temperature_limits_and_drawn_examples(inputs, tmp_path):
    root, ir, _ = inputs
    cold = CocktailSoup(ir, temperature=1e-3).fit(checkpoints(root))
    best = min(range(3), key=lambda c: cold.mean_losses[c])
    assert cold.weights[best] == pytest.approx(1.0)  # T -> 0 picks the lowest loss
    hot = CocktailSoup(ir, temperature=1e6).fit(checkpoints(root))
    assert hot.weights == pytest.approx([1 / 3] * 3, rel=1e-4)  # T -> inf is the uniform soup
    drawn = CocktailSoup(ir, num_examples=2, seed=1)
    assert len(drawn.load_examples()[0].dataset) == 2
    assert (
        drawn.load_examples()[0].dataset["anchor"]
        == CocktailSoup(ir, num_examples=2, seed=1).load_examples()[0].dataset["anchor"]
    )


def test_candidates_are_loaded_one_at_a_time(inputs, monkeypatch):
    import codiemb_st._compat

    root, ir, _ = inputs
    alive: set[int] = set()
    most = []

    class Counting(SentenceTransformer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            key = id(self)
            alive.add(key)
            weakref.finalize(self, alive.discard, key)
            most.append(len(alive))

    monkeypatch.setattr(codiemb_st._compat, "SentenceTransformer", Counting)
    CocktailSoup(ir).fit(checkpoints(root))
    assert most == [1, 1, 1]


def test_lora_adapter_candidates(tmp_path):
    import peft
    from test_merging_adapters import save_lora_checkpoint
    from tiny_model import save_tiny_model

    base = save_tiny_model(tmp_path / "base", seed=0)
    model = SentenceTransformer(str(base), device="cpu")
    recipe.use_instructions(model, query=QUERY_PROMPT, sts=STS_PROMPT)
    model.save(str(base))
    pairs = [
        save_lora_checkpoint(
            base,
            tmp_path / f"c{i}",
            peft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], init_lora_weights=False),
            seed=i,
        )
        for i in range(2)
    ]
    ir = _write_jsonl(
        tmp_path / "ir.jsonl",
        [{"query": q, "positives": [p], "negatives": [n]} for q, p, n in zip(QUERIES, POSITIVES, NEGATIVES)],
    )
    with pytest.raises(ValueError, match="LoRA adapter checkpoint, so base_model= is required"):
        CocktailSoup(ir).fit([adapter for adapter, _ in pairs])
    soup = CocktailSoup(ir, temperature=0.5)
    out = soup.merge_to_folder([pairs[0][0], pairs[1][1]], tmp_path / "m", base_model=base, show_progress_bar=False)
    # the reference: peft's own materialisation of the adapter, scored and averaged like a full checkpoint
    full = [pairs[0][1], pairs[1][1]]
    losses = [reference_ir_loss(SentenceTransformer(str(folder), device="cpu")) for folder in full]
    assert soup.fitted.mean_losses == pytest.approx(losses, rel=1e-4)
    merged = load_file(str(out / "model.safetensors"))
    for name, value in reference_average(full, soup.fitted.weights).items():
        torch.testing.assert_close(merged[name], value.float(), atol=2e-6, rtol=1e-5, msg=name)


def test_cli_merges_with_examples(inputs, tmp_path):
    root, ir, sts = inputs
    assert MERGE_METHODS["cocktail_soup"] is CocktailSoup
    argv = ["merge", *map(str, checkpoints(root)), "--method", "cocktail_soup", "--no-progress"]
    argv += ["--examples", str(ir), str(sts), "--temperature", "0.7", "--output", str(tmp_path / "cli")]
    assert main(argv) == 0
    api = CocktailSoup([ir, sts], temperature=0.7)
    api.merge_to_folder(checkpoints(root), tmp_path / "api", show_progress_bar=False)
    config = json.loads((tmp_path / "cli" / "merge_config.json").read_text())
    assert config["parameters"]["weights"] == pytest.approx(api.fitted.weights, rel=1e-6)
    cli, expected = (
        load_file(str(tmp_path / "cli/model.safetensors")),
        load_file(str(tmp_path / "api/model.safetensors")),
    )
    assert all(torch.allclose(cli[name], expected[name], atol=1e-6) for name in cli)


def test_bad_input_is_refused_and_nothing_is_written(inputs, tmp_path, capsys):
    root, ir, sts = inputs
    out = tmp_path / "deep" / "out"
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"query": "q", "positives": ["p"]}) + "\nquery,positive\n", encoding="utf8")
    unknown = _write_jsonl(tmp_path / "unknown.jsonl", [{"text": "a"}, {"text": "b"}])
    missing_positives = _write_jsonl(tmp_path / "bad_ir.jsonl", [{"query": "q", "positives": ["p"]}, {"query": "q"}])
    one = _write_jsonl(tmp_path / "one.jsonl", [{"query": "q", "positives": ["p"]}])
    flat = _write_jsonl(tmp_path / "flat.jsonl", [{"sentence1": "a", "sentence2": "b", "score": 1.0}] * 3)
    cases = [
        (CocktailSoup(wrong), f"{wrong}:2"),
        (CocktailSoup(unknown), f"{unknown}:1"),
        (CocktailSoup(missing_positives), f"{missing_positives}:2"),
        (CocktailSoup(one), "needs at least 2"),
        (CocktailSoup(flat), "two different scores"),
        (CocktailSoup(ir, num_examples=5), "fewer than num_examples=5"),
    ]
    for method, message in cases:
        with pytest.raises(ValueError, match=message):
            method.merge_to_folder(checkpoints(root), out, show_progress_bar=False)
        assert not out.exists() and not out.parent.exists()
    for kwargs, message in (
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"num_examples": 1}, "num_examples"),
    ):
        with pytest.raises(ValueError, match=message):
            CocktailSoup(ir, **kwargs)
    with pytest.raises(ValueError, match="not a file"):
        CocktailSoup(tmp_path / "nowhere.jsonl")
    with pytest.raises(ValueError, match="needs examples="):
        CocktailSoup()
    with pytest.raises(TypeError, match="list of model folders"):
        CocktailSoup(ir).fit(str(checkpoints(root)[0]))
    with pytest.raises(ValueError, match="at least 2 checkpoints"):
        CocktailSoup(ir).fit(checkpoints(root)[:1])

    # a candidate whose loss is NaN
    broken = tmp_path / "broken"
    SentenceTransformer(str(checkpoints(root)[1]), device="cpu").save(str(broken))
    weights = load_file(str(broken / "2_Dense/model.safetensors"))
    weights = {name: torch.full_like(value, float("nan")) for name, value in weights.items()}
    save_file(weights, str(broken / "2_Dense/model.safetensors"))
    with pytest.raises(ValueError, match=r"checkpoints\[1\] \(.*broken\) has a nan loss"):
        CocktailSoup(ir).merge_to_folder([checkpoints(root)[0], broken], out, show_progress_bar=False)
    assert not out.parent.exists()

    # the same from the command line: exit code 2, the culprit named, nothing written
    paths = list(map(str, checkpoints(root)))
    for extra, message in (
        (["--examples", str(wrong)], f"{wrong}:2"),
        (["--examples", str(ir), "--temperature", "0"], "temperature"),
        ([], "needs examples="),
    ):
        argv = ["merge", *paths, "--method", "cocktail_soup", *extra, "--output", str(out), "--no-progress"]
        assert main(argv) == 2
        assert message in capsys.readouterr().err
        assert not out.parent.exists()


def test_layer_group_of_tensor_names():
    from codiemb_st.merging.cocktail_examples import layer_group

    assert layer_group(0, "embeddings.word_embeddings.weight") == "embeddings"
    assert layer_group(0, "embeddings.LayerNorm.bias") == "embeddings"
    assert layer_group(0, "encoder.layer.1.attention.self.query.weight") == "block.1"
    assert layer_group(0, "layers.12.mlp.down_proj.weight") == "block.12"  # decoders (Qwen2, Llama)
    assert layer_group(0, "embed_tokens.weight") == "embeddings"
    assert layer_group(0, "norm.weight") == "head" and layer_group(0, "pooler.dense.weight") == "head"
    assert layer_group(2, "linear.weight") == "head"  # a Dense module


def _truncated(folder: Path, num_blocks: int) -> SentenceTransformer:
    """The candidate cut after ``num_blocks`` transformer blocks, pooled by its own Pooling (no Dense/Normalize)."""
    model = SentenceTransformer(str(folder), device="cpu")
    model[0].auto_model.encoder.layer = model[0].auto_model.encoder.layer[:num_blocks]
    return SentenceTransformer(modules=[model[0], model[1]], device="cpu", prompts=model.prompts)


def test_layer_group_weights_and_tensors_equal_loop_references(inputs, tmp_path):
    root, ir, _ = inputs
    soup = CocktailSoup(ir, temperature=0.5, layer_groups=True)
    out = soup.merge_to_folder(checkpoints(root), tmp_path / "m", show_progress_bar=False)
    groups = soup.fitted.group_losses
    assert list(groups) == ["embeddings", "block.0", "block.1", "head"]
    # Each group's loss, by hand: the model cut after that block (0 blocks: the embedding output), mean-pooled with
    # the prompt excluded, through the hand InfoNCE; the head is the whole model.
    for c, folder in enumerate(checkpoints(root)):
        for group, blocks in (("embeddings", 0), ("block.0", 1), ("block.1", 2)):
            expected = reference_ir_loss(_truncated(folder, blocks))
            assert groups[group][c] == pytest.approx(expected, rel=1e-4, abs=1e-5), (group, c)
        assert groups["head"][c] == pytest.approx(reference_ir_loss(SentenceTransformer(str(folder))), rel=1e-4)
    for group, losses in groups.items():
        assert soup.fitted.group_weights[group] == pytest.approx(reference_weights(losses, 0.5), rel=1e-6)
    assert soup.fitted.group_weights["block.0"] != pytest.approx(soup.fitted.group_weights["head"], rel=1e-3)

    from codiemb_st.merging.cocktail_examples import layer_group

    states = [load_file(str(folder / "model.safetensors")) for folder in checkpoints(root)]
    merged = load_file(str(out / "model.safetensors"))
    for name in merged:
        weights = soup.fitted.group_weights[layer_group(0, name)]
        expected = sum(w * state[name].double() for w, state in zip(weights, states))
        torch.testing.assert_close(merged[name], expected.float(), atol=1e-6, rtol=1e-6, msg=name)
    dense = reference_average(checkpoints(root), soup.fitted.group_weights["head"], "2_Dense/model.safetensors")
    for name, value in load_file(str(out / "2_Dense/model.safetensors")).items():
        torch.testing.assert_close(value, dense[name].float(), atol=1e-6, rtol=1e-6)
    config = json.loads((out / "merge_config.json").read_text())["parameters"]
    assert config["layer_groups"] is True and config["group_weights"] == soup.fitted.group_weights
