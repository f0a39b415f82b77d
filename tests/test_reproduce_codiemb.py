"""benchmarks/reproduce_codiemb.py: dev hold-out, naive pairs, dev/sampled tasks, and a tiny end-to-end run."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import sys
from pathlib import Path

import pytest
from evaluation_fixtures import write_retrieval_task, write_sts_task
from safetensors.torch import load_file
from tiny_model import ENGLISH_SENTENCES

from codiemb_st.evaluation import load_local_task


def _load_script():
    """The benchmark script as a module (benchmarks/ is not a package, and nothing edits sys.path)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce_codiemb.py"
    spec = importlib.util.spec_from_file_location("reproduce_codiemb", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


rc = _load_script()

RUN_LABELS = ["base", "ir_only", "sts_only", "naive", "codiemb", "delta_soup", "model_soup"]


def test_dev_split_is_fixed_disjoint_and_bounded():
    records = [{"i": i} for i in range(100)]
    train, dev = rc.split_dev(records, 30, "file_a")
    assert len(dev) == 20  # at most a fifth of the file
    assert sorted(r["i"] for r in train + dev) == list(range(100))
    assert rc.split_dev(records, 30, "file_a") == (train, dev)  # independent of any run seed
    assert rc.split_dev(records, 30, "file_b")[1] != dev  # each file has its own draw
    assert rc.split_dev(records, 0, "file_a") == (records, [])


def test_naive_pairs_use_the_top_of_each_files_score_range():
    rows = [{"sentence1": f"a{i}", "sentence2": f"b{i}", "score": s} for i, s in enumerate([0, 1, 2, 3, 4, 5])]
    assert [r["query"] for r in rc.naive_pairs(rows, 0.75)] == ["a4", "a5"]  # (s - 0) / 5 >= 0.75
    binary = [{"sentence1": "x", "sentence2": "y", "score": 1}, {"sentence1": "p", "sentence2": "q", "score": 0}]
    assert rc.naive_pairs(binary, 0.75) == [{"query": "x", "positives": ["y"]}]
    assert rc.naive_pairs([{"sentence1": "x", "sentence2": "y", "score": 2}], 0.75) == []  # no range, no positive


def test_dev_tasks_load_with_the_held_out_data(tmp_path):
    sts = {"s": [{"sentence1": "a", "sentence2": "b", "score": 1.0}, {"sentence1": "c", "sentence2": "d", "score": 4}]}
    ir = {
        "f1": [{"query": "q one", "positives": ["p1", "p2"], "negatives": ["n1"]}],
        "f2": [{"query": "q two", "positives": ["p1"], "negatives": []}],
    }
    folders = rc.write_dev_tasks(tmp_path, "en", sts, ir)
    sts_task, ir_task = (load_local_task(folder) for folder in folders)
    assert sts_task.dataset["default"]["dev"]["score"] == [1.0, 4.0]
    assert (sts_task.min_score, sts_task.max_score) == (1.0, 4.0)
    data = ir_task.dataset["default"]["dev"]
    texts = dict(zip(data["corpus"]["id"], data["corpus"]["text"]))
    relevant = {qid: sorted(texts[d] for d in docs) for qid, docs in data["relevant_docs"].items()}
    assert relevant == {"f1-0": ["p1", "p2"], "f2-0": ["p1"]}  # a shared passage is one document
    assert sorted(texts.values()) == ["n1", "p1", "p2"]


def test_sts_test_sets_are_sampled_with_their_task_class(tmp_path):
    write_sts_task(tmp_path / "data" / "STSBenchmark", name="STSBenchmark", mteb_task="STSBenchmark")
    write_retrieval_task(tmp_path / "data" / "TinyRetrieval", name="TinyRetrieval")
    refs = rc.sample_sts_tasks(["STSBenchmark", "TinyRetrieval"], tmp_path / "data", 5, tmp_path / "out", seed=1)
    assert refs[1] == "TinyRetrieval" and isinstance(refs[0], Path)
    meta = json.loads((refs[0] / "task.json").read_text())
    assert meta["mteb_task"] == "STSBenchmark" and meta["sample"]["pairs_kept"] == 5
    task = load_local_task(refs[0])
    assert type(task).__name__ == "STSBenchmarkSTS" and len(task.dataset["default"]["test"]) == 5
    # A cap above the set's size, or 0, keeps the set as it is.
    assert rc.sample_sts_tasks(["STSBenchmark"], tmp_path / "data", 1000, tmp_path / "o2", 1) == ["STSBenchmark"]
    assert rc.sample_sts_tasks(["STSBenchmark"], tmp_path / "data", 0, tmp_path / "o3", 1) == ["STSBenchmark"]


def _write_gz(path: Path, rows: list[dict]) -> Path:
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return path


@pytest.fixture(scope="module")
def tiny_setup(tmp_path_factory):
    from sentence_transformers import SentenceTransformer
    from tiny_model import save_tiny_model

    root = tmp_path_factory.mktemp("reproduce")
    # Loading the tiny BERT adds a (randomly initialised) pooler; save it once more so that every run starts from
    # exactly the saved weights, as a real base model folder does.
    model = root / "base"
    SentenceTransformer(str(save_tiny_model(root / "raw", seed=0)), device="cpu").save(str(model))
    rng = random.Random(0)
    words = " ".join(ENGLISH_SENTENCES).split()

    def sentence() -> str:
        return " ".join(rng.choice(words) for _ in range(6))

    ir = [{"query": sentence(), "positives": [sentence()], "negatives": [sentence()]} for _ in range(60)]
    sts = [{"sentence1": sentence(), "sentence2": sentence(), "score": rng.randint(0, 5)} for _ in range(60)]
    files = {"ir": _write_gz(root / "toy_ir.jsonl.gz", ir), "sts": _write_gz(root / "toy_sts.jsonl.gz", sts)}
    data = root / "eval"
    write_sts_task(data / "TinySTS")
    write_retrieval_task(data / "TinyRetrieval")
    return root, model, files, data


def _argv(tiny_setup, out: Path, *extra: str) -> list[str]:
    root, model, files, data = tiny_setup
    return [
        "--track", "en", "--output-dir", str(out), "--base-model", str(model),
        "--ir-files", str(files["ir"]), "--sts-files", str(files["sts"]),
        "--eval-tasks", "TinySTS", "TinyRetrieval", "--eval-data-dir", str(data),
        "--max-steps", "2", "--ir-batch-size", "4", "--sts-batch-size", "6", "--mini-batch-size", "3",
        "--max-seq-length", "16", "--eval-max-seq-length", "16", "--dev-sts-pairs", "8", "--dev-ir-records", "8",
        "--geometry-samples", "20", "--eval-batch-size", "8", *extra,
    ]  # fmt: skip


def test_end_to_end_trains_merges_evaluates_and_resumes(tiny_setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert rc.main(_argv(tiny_setup, out)) == 0
    results = json.loads((out / "en" / "results.json").read_text())
    assert list(results["scores"]) == RUN_LABELS
    for label in RUN_LABELS:
        assert set(results["scores"][label]) == {"TinySTS", "TinyRetrieval", "dev-toy_sts", "dev-ir"}
        assert {"anisotropy", "effective_rank", "alignment"} <= set(results["geometry"][label])
        assert set(results["means_test"][label]) == {"retrieval_mean", "sts_mean", "mean_task_type"}
    for run in rc.TRAINED_RUNS:
        assert results["training"][run]["steps"] == 2
    # Each run trained on its own data: the specialists one task, the naive run everything through one loss.
    rows = {run: set(results["training"][run]["rows"]) for run in rc.TRAINED_RUNS}
    assert rows == {
        "ir_only": {"toy_ir"},
        "sts_only": {"toy_sts"},
        "naive": {"toy_ir", "toy_sts"},
        "codiemb": {"toy_ir", "toy_sts"},
    }
    # The dev records were held out of training: 60 - 8 rows; the naive STS set keeps only scores >= 3.75 of 5.
    assert results["training"]["codiemb"]["rows"] == {"toy_ir": 52, "toy_sts": 52}
    assert results["training"]["naive"]["rows"]["toy_sts"] < 52
    # Trained weights moved, and the two soups differ from each other and from their ingredients.
    models = out / "en" / "models"
    weights = {name: load_file(str(models / name / "model.safetensors")) for name in RUN_LABELS[1:]}
    key = next(k for k in weights["codiemb"] if k.endswith("attention.self.query.weight"))
    assert not weights["delta_soup"][key].equal(weights["model_soup"][key])
    assert not weights["codiemb"][key].equal(weights["ir_only"][key])
    report = (out / "en" / "results.md").read_text()
    assert "Claims (test)" in report and "DeltaSoup vs Model Soup" in report and "Wall time" in report
    assert (out / "en" / "results.png").stat().st_size > 0
    capsys.readouterr()

    # A second call reuses every finished run and evaluation and reports the same numbers.
    assert rc.main(_argv(tiny_setup, out)) == 0
    assert capsys.readouterr().err.count("reusing the finished run") == len(rc.TRAINED_RUNS)
    assert json.loads((out / "en" / "results.json").read_text())["scores"] == results["scores"]

    # Deterministic for a seed: a fresh output folder gives the same weights.
    other = tmp_path / "again"
    assert rc.main(_argv(tiny_setup, other)) == 0
    again = load_file(str(other / "en" / "models" / "codiemb" / "model.safetensors"))
    assert all(again[name].equal(tensor) for name, tensor in weights["codiemb"].items())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--naive-threshold", "1.5"], "--naive-threshold must be in"),
        (["--max-steps", "0"], "--max-steps must be a positive integer"),
        (["--soup-seeds", "1", "--no-specialists-in-soup"], "A soup needs two ingredients"),
    ],
)
def test_bad_arguments_are_refused_before_work(tiny_setup, tmp_path, capsys, extra, message):
    assert rc.main(_argv(tiny_setup, tmp_path / "bad", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_missing_training_file_is_a_usage_error(tiny_setup, tmp_path, capsys):
    argv = _argv(tiny_setup, tmp_path / "missing")
    argv[argv.index("--ir-files") + 1] = str(tmp_path / "nope.jsonl.gz")
    assert rc.main(argv) == 2
    assert "nope.jsonl.gz not found" in capsys.readouterr().err


def test_claim_checks_call_small_differences_a_tie():
    def means(ir, sts):
        return {"retrieval_mean": ir, "sts_mean": sts, "mean_task_type": (ir + sts) / 2}

    summary = {
        "naive": means(0.70, 0.40),
        "codiemb": means(0.70, 0.46),  # +3 pts overall
        "ir_only": means(0.72, 0.40),
        "sts_only": means(0.70, 0.47),
        "delta_soup": means(0.70, 0.461),  # +0.05 pts over the model soup
        "model_soup": means(0.70, 0.460),
    }
    geometry = {name: {"anisotropy": 0.5, "effective_rank": 100.0, "condition_number": None} for name in summary}
    geometry["base"] = geometry["naive"]
    lines = rc.claims(summary, geometry)
    assert "+3.00 pts" in lines[0] and lines[0].endswith("-> holds.")
    assert "IR -2.00 pts vs IR-only, STS -1.00 pts vs STS-only" in lines[1]
    assert "tie" in lines[2]
    assert "condition number inf / inf / inf" in lines[3]
