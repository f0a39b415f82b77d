"""benchmarks/reproduce_codiemb.py: dev hold-out, naive pairs, dev/sampled tasks, and a tiny end-to-end run."""

from __future__ import annotations

import gzip
import importlib.util
import json
import random
import shutil
import sys
from pathlib import Path

import pytest
from evaluation_fixtures import write_retrieval_task, write_sts_task
from safetensors.torch import load_file
from tiny_model import ENGLISH_SENTENCES

from codiemb_st.evaluation import load_local_task

pytestmark = pytest.mark.study  # end-to-end studies: a quick run skips them (-m 'not study')


def _load_script(name: str = "reproduce_codiemb"):
    """A benchmark script as a module (benchmarks/ is not a package, and nothing edits sys.path)."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


rc = _load_script()
fusion = _load_script("fusion_study")

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


MAIN = ["ir_only", "sts_only", "naive", "codiemb"]
#: An option of the fusion study added after the old script (off by default: the results are otherwise the same).
NEW_FUSION_OPTION = "test_picked"
#: The shared two-seed run's options (its corpus capped so that the fusion study's merges evaluate quickly).
TWO_SEEDS = ("--seeds", "1", "2", "--runs", *MAIN, "--corpus-cap", "9")


def test_budget_arithmetic():
    for run in ("ir_only", "sts_only"):
        assert rc.run_steps(run, "equal-updates", 75) == 75 and rc.run_steps(run, "equal-steps", 75) == 75
    for run in ("naive", "codiemb", "codiemb_cosent", "mixed", "codiemb_no_midnce"):
        assert rc.run_steps(run, "equal-updates", 75) == 150  # as many updates per task as each specialist
        assert rc.run_steps(run, "equal-steps", 75) == 75
    with pytest.raises(ValueError, match="budget"):
        rc.run_steps("codiemb", "equal-time", 75)


@pytest.fixture(scope="module")
def two_seed_run(tiny_setup, tmp_path_factory):
    """The main runs over two seeds, trained once for the tests below (each copies it before changing it)."""
    root = tmp_path_factory.mktemp("two_seeds")
    out, results_dir = root / "run", root / "committed"
    argv = _argv(tiny_setup, out, *TWO_SEEDS, "--results-dir", str(results_dir))
    assert rc.main(argv) == 0
    return out, results_dir


def _copy_run(two_seed_run, tmp_path: Path) -> tuple[Path, Path]:
    out, results_dir = (tmp_path / "run", tmp_path / "committed")
    shutil.copytree(two_seed_run[0], out)
    shutil.copytree(two_seed_run[1], results_dir)
    return out, results_dir


def test_end_to_end_two_seeds_budget_soups_and_resume(tiny_setup, two_seed_run, tmp_path, capsys):
    out, results_dir = _copy_run(two_seed_run, tmp_path)
    results = json.loads((out / "en" / "results.json").read_text())
    assert (results_dir / "en" / "results.json").read_text() == (out / "en" / "results.json").read_text()
    assert list(results["scores"]) == ["base", *MAIN, "delta_soup", "model_soup"]
    assert results["seeds"]["base"] == [0] and all(results["seeds"][r] == [1, 2] for r in MAIN)
    for label, by_seed in results["scores"].items():
        for scores in by_seed.values():
            assert set(scores) == {"TinySTS", "TinyRetrieval", "dev-toy_sts", "dev-ir"}
        assert set(results["means"]["test"][label]) == {"retrieval_mean", "sts_mean", "mean_task_type"}
    # equal-updates with 2 steps per task: the specialists take 2 steps of their task; the joint runs 4 steps,
    # CoDiEmb alternating 2 IR and 2 STS updates, naive co-training 4 updates of its one (InfoNCE) loss.
    assert results["budget"]["steps"] == {"ir_only": 2, "sts_only": 2, "naive": 4, "codiemb": 4}
    training = results["training"]
    assert training["ir_only"]["1"]["updates_per_task"] == {"ir": 2, "sts": 0}
    assert training["sts_only"]["2"]["updates_per_task"] == {"ir": 0, "sts": 2}
    assert training["codiemb"]["1"]["updates_per_task"] == {"ir": 2, "sts": 2}
    assert training["naive"]["1"]["updates_per_task"] == {"ir": 4, "sts": 0}
    rows = {run: set(training[run]["1"]["rows"]) for run in MAIN}
    assert rows == {
        "ir_only": {"toy_ir"},
        "sts_only": {"toy_sts"},
        "naive": {"toy_ir", "toy_sts"},
        "codiemb": {"toy_ir", "toy_sts"},
    }
    # The dev records were held out of training: 60 - 8 rows; the naive STS set keeps only scores >= 3.75 of 5.
    assert training["codiemb"]["1"]["rows"] == {"toy_ir": 52, "toy_sts": 52}
    assert training["naive"]["1"]["rows"]["toy_sts"] < 52
    # Seeds differ; the soups differ from each other and from their ingredients.
    models = out / "en" / "models"
    codiemb = {seed: load_file(str(models / "codiemb" / f"seed{seed}" / "model.safetensors")) for seed in (1, 2)}
    key = next(k for k in codiemb[1] if k.endswith("attention.self.query.weight"))
    assert not codiemb[1][key].equal(codiemb[2][key])
    delta = load_file(str(models / "delta_soup" / "seed1" / "model.safetensors"))
    soup = load_file(str(models / "model_soup" / "seed1" / "model.safetensors"))
    assert not delta[key].equal(soup[key]) and not delta[key].equal(codiemb[1][key])
    report = (out / "en" / "results.md").read_text()
    assert "Claim rule: paired by seed" in report and "over 2 seed(s)" in report and " ± " in report
    assert "Budget `equal-updates`" in report and "DeltaSoup beats Model Soup" in report
    capsys.readouterr()

    # Resume: a second call reuses every run; adding an ablation trains only it (first seed only).
    resume = _argv(tiny_setup, out, "--seeds", "1", "2", "--runs", *MAIN, "mixed", "--corpus-cap", "9")
    assert rc.main([*resume, "--results-dir", str(results_dir)]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing the finished run") == 2 * len(MAIN)
    assert "mixed seed 1: 4 steps" in err and "mixed seed 2" not in err
    again = json.loads((out / "en" / "results.json").read_text())
    assert again["seeds"]["mixed"] == [1]
    assert {k: v for k, v in again["scores"].items() if k != "mixed"} == results["scores"]
    assert "single-task steps beat the mixed sampler" in (out / "en" / "results.md").read_text()

    # Deterministic for a seed: a fresh output folder gives the same weights.
    other = tmp_path / "again"
    assert rc.main(_argv(tiny_setup, other, "--seeds", "1", "--runs", "codiemb", "--corpus-cap", "9")) == 0
    fresh = load_file(str(other / "en" / "models" / "codiemb" / "seed1" / "model.safetensors"))
    assert all(fresh[name].equal(tensor) for name, tensor in codiemb[1].items())


def test_evaluation_samples_are_the_same_for_every_training_seed(tiny_setup, tmp_path):
    # Seeds run in separate invocations (one per core) must evaluate on the same sampled test pairs, corpus
    # subsample and geometry texts as a run of all seeds together: the sample follows --eval-seed, not --seeds.
    capped = ("--runs", "sts_only", "--corpus-cap", "9", "--sts-pair-cap", "6")
    runs = {
        "together": ("--seeds", "1", "2"),
        "alone": ("--seeds", "2"),
        "other": ("--seeds", "2", "--eval-seed", "7"),
    }
    results = {}
    for name, extra in runs.items():
        assert rc.main(_argv(tiny_setup, tmp_path / name, *capped, *extra)) == 0
        results[name] = json.loads((tmp_path / name / "en" / "results.json").read_text())
    together, alone, other = results["together"], results["alone"], results["other"]
    assert alone["corpus_subsample"] == together["corpus_subsample"] != other["corpus_subsample"]
    assert alone["scores"]["base"] == together["scores"]["base"]
    assert alone["scores"]["sts_only"]["2"] == together["scores"]["sts_only"]["2"]
    assert alone["geometry"]["base"] == together["geometry"]["base"] != other["geometry"]["base"]
    sample = json.loads((tmp_path / "alone" / "en" / "test_samples" / "TinySTS" / "task.json").read_text())
    assert sample["sample"]["seed"] == 42
    cache = json.loads((tmp_path / "other" / "en" / "eval" / "base-seed0.json").read_text())
    assert cache["key"]["eval_seed"] == 7


def test_fusion_study_merges_the_reproductions_runs_on_its_items(tiny_setup, two_seed_run, tmp_path, capsys):
    out, _ = _copy_run(two_seed_run, tmp_path)
    reproduction = json.loads((out / "en" / "results.json").read_text())
    study, committed = tmp_path / "fusion", tmp_path / "committed"
    argv = ["--reproduction", str(out / "en"), "--output-dir", str(study), "--results-dir", str(committed)]
    argv += ["--methods", "delta_soup", "model_stock", "multi_slerp", "multi_slerp_weights", "cocktail_5"]
    argv += ["--greedy", "model_soup", "--also-test", "model_stock", "--test-picked"]
    capsys.readouterr()
    assert fusion.main(argv) == 0
    # The reproduction's base, runs and soups (7 models x 2 seeds, base once) were scored, not evaluated again.
    assert "reusing 13 evaluations" in capsys.readouterr().err
    results = json.loads((committed / "results.json").read_text())
    assert list(results["sets"]) == ["S1_seeds", "S2_tasks@1", "S2_tasks@2"]
    assert results["sets"]["S2_tasks@1"]["ingredients"] == ["codiemb/seed1", "ir_only/seed1", "sts_only/seed1"]
    # Same items, prompts and lengths: the study's Model Soup (same recipe, same weights) has the reproduction's
    # scores on dev and test, task by task.
    for seed in ("1", "2"):
        soup = results["sets"][f"S2_tasks@{seed}"]["rows"]["model_soup"]
        expected = reproduction["scores"]["model_soup"][seed]
        assert soup["dev"]["dev-toy_sts"] == expected["dev-toy_sts"] and soup["dev"]["dev-ir"] == expected["dev-ir"]
        assert soup["test"]["TinySTS"] == expected["TinySTS"]
        assert soup["test"]["TinyRetrieval"] == expected["TinyRetrieval"]
    assert set(results["sets"]["S1_seeds"]["rows"]) == {
        "model_soup",
        "delta_soup",
        "model_stock",
        "multi_slerp",
        "multi_slerp_weights",
        "cocktail_5",
        "greedy_model_soup",
    }
    # --test-picked: each family's dev-picked setting is on test, and a family of two settings is paired with Model
    # Soup as "<family> (picked on dev)", seed by seed with the setting that seed's dev picked.
    family = results["across_seeds"]["multi_slerp (picked on dev)"]
    assert family["dev"]["seeds"] == family["test"]["seeds"] == [1, 2]
    for index, seed in enumerate((1, 2)):
        block = results["sets"][f"S2_tasks@{seed}"]
        pick = block["picked"]["multi_slerp"]
        assert pick in {"multi_slerp", "multi_slerp_weights"} and "test" in block["rows"][pick]
        expected = (
            block["rows"][pick]["test"]["mean_task_type"] - block["rows"]["model_soup"]["test"]["mean_task_type"]
        )
        assert family["test"]["differences"][index] == pytest.approx(expected)
    # CocktailSoup's examples: 5 records of each training file, drawn outside the reproduction's dev hold-out.
    cocktail = results["sets"]["S2_tasks@1"]["rows"]["cocktail_5"]
    assert cocktail["method"].startswith("CocktailSoup(") and "cocktail_5" in results["across_seeds"]
    _, _, files, _ = tiny_setup
    for task, dev_size, key in (("ir", 8, "query"), ("sts", 8, "sentence1")):
        drawn = [
            json.loads(line) for line in (study / "examples" / "5" / f"toy_{task}.jsonl").read_text().splitlines()
        ]
        records = [json.loads(line) for line in gzip.open(files[task], "rt")]
        dev = rc.split_dev(records, dev_size, f"toy_{task}")[1]
        assert len(drawn) == 5 and all(r in records for r in drawn)
        assert not {r[key] for r in drawn} & {r[key] for r in dev}
    merged = json.loads((study / "merged" / "S2_tasks@1" / "cocktail_5" / "merge_config.json").read_text())
    assert merged["parameters"]["weights"] == pytest.approx([1 / 3] * 3, abs=0.2)  # T = 5: close to uniform
    # Paired by seed against Model Soup, with the reproduction's rule.
    assert results["across_seeds"]["model_stock"]["test"]["seeds"] == [1, 2]  # --also-test: paired on test too
    paired = results["across_seeds"]["model_stock"]["dev"]
    assert paired["seeds"] == [1, 2] and paired["verdict"] in {"holds", "reversed", "inconclusive"}
    rows = {seed: results["sets"][f"S2_tasks@{seed}"]["rows"] for seed in ("1", "2")}
    difference = rows["1"]["model_stock"]["dev"]["mean_task_type"] - rows["1"]["model_soup"]["dev"]["mean_task_type"]
    assert paired["differences"][0] == pytest.approx(difference)
    report = (committed / "results.md").read_text()
    assert "paired by seed" in report
    kept = report.split("greedy_model_soup (kept: ")[1].split(")")[0].split(", ")
    assert kept and all(name.split("/")[0] in {"codiemb", "ir_only", "sts_only"} for name in kept)
    # Bad input: exit 2 with the reason, nothing written.
    assert fusion.main(["--reproduction", str(tmp_path / "missing"), "--results-dir", str(tmp_path / "r")]) == 2
    assert "no results.json" in capsys.readouterr().err and not (tmp_path / "r").exists()
    assert fusion.main([*argv, "--sets", "S9"]) == 2
    assert "has the sets" in capsys.readouterr().err
    assert fusion.main([*argv, "--also-test", "ties_d0.2"]) == 2
    assert "not among the merges run" in capsys.readouterr().err


def test_equal_steps_budget_halves_each_tasks_updates(tiny_setup, tmp_path):
    out = tmp_path / "steps"
    assert rc.main(_argv(tiny_setup, out, "--runs", "codiemb", "--budget", "equal-steps", "--only-dev")) == 0
    results = json.loads((out / "en" / "results.json").read_text())
    assert results["budget"]["name"] == "equal-steps"
    assert results["training"]["codiemb"]["42"]["updates_per_task"] == {"ir": 1, "sts": 1}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--naive-threshold", "1.5"], "--naive-threshold must be in"),
        (["--max-steps", "0"], "--max-steps must be a positive integer"),
        (["--seeds", "1", "1"], "--seeds must be distinct"),
        (["--runs", "codiemb", "nope"], "Unknown --runs"),
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


def _evaluation(ir: float, sts: float) -> dict:
    return {"scores": {"R": ir, "S": sts}, "types": {"R": "retrieval", "S": "sts"}}


def test_claims_pair_runs_by_seed_with_one_rule():
    # codiemb beats naive by 3 pts (STS) in every seed -> holds; the soups differ by +-0.1 -> inconclusive.
    results = {
        "naive": {1: _evaluation(0.70, 0.40), 2: _evaluation(0.71, 0.42), 3: _evaluation(0.69, 0.41)},
        "codiemb": {1: _evaluation(0.70, 0.46), 2: _evaluation(0.71, 0.48), 3: _evaluation(0.69, 0.47)},
        "ir_only": {1: _evaluation(0.72, 0.40), 2: _evaluation(0.73, 0.40), 3: _evaluation(0.70, 0.40)},
        "sts_only": {1: _evaluation(0.70, 0.50), 2: _evaluation(0.70, 0.51), 3: _evaluation(0.70, 0.52)},
        "delta_soup": {1: _evaluation(0.70, 0.461), 2: _evaluation(0.70, 0.459), 3: _evaluation(0.70, 0.462)},
        "model_soup": {1: _evaluation(0.70, 0.460), 2: _evaluation(0.70, 0.460), 3: _evaluation(0.70, 0.460)},
    }
    lines = rc.claims(results, ["R", "S"])
    assert "+3.00 ± 0.00 pts over 3 seed(s) -> holds" in lines[0]
    # IR gap -1.67 pts: within 1 pt fails (reversed); STS gap -4 pts: reversed.
    assert "IR vs ir_only -0.67" in lines[1] and "reversed" in lines[1]
    assert "-> inconclusive" in lines[2]
    one_seed = {name: {1: by_seed[1]} for name, by_seed in results.items()}
    assert "untestable (1 seed)" in rc.claims(one_seed, ["R", "S"])[0]


def test_baseline_and_ablation_runs_build_their_own_sts_loss(tiny_model):
    from sentence_transformers.sentence_transformer.losses import CoSENTLoss

    from codiemb_st import PearsonSpearmanLoss, recipe

    data = recipe.load_task_datasets(
        {}, {"s": [{"sentence1": "a b", "sentence2": "b c", "score": 1.0}] * 2}, num_negatives=0
    )
    expected = {"codiemb": 1.0, "codiemb_no_midnce": 0.0}
    for run, weight in expected.items():
        (loss,) = set(recipe.build_task_losses(tiny_model, data, **dict(rc.RUNS[run].sts_options)).values())
        assert isinstance(loss, PearsonSpearmanLoss) and loss.mid_nce_weight == weight
    assert isinstance(recipe.build_task_losses(tiny_model, data, sts_loss="cosent")["s"], CoSENTLoss)
    assert rc.RUNS["codiemb_cosent"].sts_loss == "cosent" and rc.RUNS["mixed"].sampler == "proportional"
    assert [run for run, spec in rc.RUNS.items() if not spec.ablation] == ["ir_only", "sts_only", "naive", "codiemb"]


def _files(folder: Path) -> dict[str, int | bytes]:
    """Every file under ``folder`` with its modification time (ns): a reused result is not rewritten. The dev and
    test-sample task folders (the fusion study's dev-<caps>), written anew by every invocation, are compared by their bytes."""

    def rewritten(relative: Path) -> bool:
        return bool({"dev_data", "test_samples"} & set(relative.parts)) or relative.parts[0].startswith("dev-")

    files = {p.relative_to(folder): p for p in folder.rglob("*") if p.is_file()}
    return {str(r): p.read_bytes() if rewritten(r) else p.stat().st_mtime_ns for r, p in files.items()}


def test_runs_merges_and_caches_written_by_the_old_scripts_are_reused(tiny_setup, tmp_path, capsys):
    # The scripts before codiemb_st.experiments (from git) write a reproduction and a fusion study; the new scripts,
    # run with the same command lines on the same folders, recognise every run, soup, merge and evaluation (nothing
    # is trained, merged or evaluated again) and write the same results.
    from legacy_studies import load_legacy_script

    old_rc, old_fusion = (
        load_legacy_script("reproduce_codiemb", tmp_path),
        load_legacy_script("fusion_study", tmp_path),
    )
    out, study, committed = tmp_path / "run", tmp_path / "fusion", tmp_path / "committed"
    argv = _argv(tiny_setup, out, "--seeds", "3", "--runs", "sts_only", "ir_only", "codiemb", "--corpus-cap", "9")
    assert old_rc.main(argv) == 0
    old_results = json.loads((out / "en" / "results.json").read_text())
    old_report = (out / "en" / "results.md").read_text()
    before = _files(out)
    capsys.readouterr()
    assert rc.main(argv) == 0
    assert capsys.readouterr().err.count("reusing the finished run") == 3
    after = _files(out)
    assert {name: after[name] for name in before if not name.startswith(("results.", "en/results."))} == {
        name: stamp for name, stamp in before.items() if not name.startswith(("results.", "en/results."))
    }
    new_results = json.loads((out / "en" / "results.json").read_text())
    assert new_results.pop("wall_seconds") >= 0 and old_results.pop("wall_seconds") >= 0
    # The teacher options the reproduction gained (issue 30), at their defaults, are the only new configuration.
    new_options = {key: new_results["config"].pop(key) for key in ("ir_loss_option", "ir_loss_options", "guide")}
    assert new_options == {"ir_loss_option": [], "ir_loss_options": {}, "guide": None}
    assert new_results == old_results

    def without_wall_time(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith("Wall time of this invocation")]

    assert without_wall_time((out / "en" / "results.md").read_text()) == without_wall_time(old_report)

    fusion_argv = ["--reproduction", str(out / "en"), "--output-dir", str(study), "--results-dir", str(committed)]
    fusion_argv += ["--methods", "delta_soup", "model_stock", "--greedy", "model_soup"]
    assert old_fusion.main(fusion_argv) == 0
    old_fused = json.loads((committed / "results.json").read_text())
    before = _files(study)
    assert fusion.main(fusion_argv) == 0
    assert _files(study) == before  # every merge, greedy soup, example file and evaluation reused
    new_fused = json.loads((committed / "results.json").read_text())
    assert (
        len(new_fused.pop("wall_seconds_by_invocation")) == 2 == 1 + len(old_fused.pop("wall_seconds_by_invocation"))
    )
    assert new_fused["config"].pop(NEW_FUSION_OPTION) is False
    assert new_fused == old_fused and list(new_fused["sets"]) == ["S2_tasks@3"]


def test_trained_fusion_study_keeps_checkpoints_and_reuses_the_old_scripts_runs(tiny_setup, tmp_path, monkeypatch):
    # The trained study (its own ingredient runs, intermediate checkpoints, its own dev hold-out) on the tiny files,
    # first by the old script, then by the new one on the same folders: nothing is trained, merged or evaluated again.
    from legacy_studies import load_legacy_script

    import studies.fusion as fusion_module

    _, model, files, data = tiny_setup
    old_fusion = load_legacy_script("fusion_study", tmp_path)
    for module in (old_fusion, fusion_module):
        monkeypatch.setattr(module, "IR_FILES", [files["ir"]])
        monkeypatch.setattr(module, "STS_FILES", [files["sts"]])
        monkeypatch.setattr(module, "TEST_TASKS", ["TinySTS", "TinyRetrieval"])
        monkeypatch.setattr(module, "EVAL", data)
    out, committed = tmp_path / "fusion", tmp_path / "committed"
    argv = ["--output-dir", str(out), "--results-dir", str(committed), "--base-model", str(model)]
    argv += ["--sets", "S3_steps", "--methods", "delta_soup", "--greedy", "none", "--max-steps", "3"]
    argv += ["--ir-batch-size", "4", "--sts-batch-size", "6", "--max-seq-length", "16", "--eval-max-seq-length", "16"]
    argv += ["--dev-sts-pairs", "8", "--dev-ir-records", "8", "--dev-eval-ir-records", "4", "--corpus-cap", "9"]
    assert old_fusion.main(argv) == 0
    old_results = json.loads((committed / "results.json").read_text())
    before = _files(out)
    assert fusion.main(argv) == 0
    assert _files(out) == before
    new_results = json.loads((committed / "results.json").read_text())
    assert len(new_results.pop("wall_seconds_by_invocation")) == 2
    old_results.pop("wall_seconds_by_invocation")
    assert new_results["config"].pop(NEW_FUSION_OPTION) is False
    assert new_results == old_results
    # The seeds' runs and the kept checkpoints at 1/3 and 2/3 of training (steps 1 and 2 of 3).
    models = out / "models"
    assert {p.name for p in models.iterdir()} == {
        "codiemb_s1",
        "codiemb_s1@1",
        "codiemb_s1@2",
        "codiemb_s2",
        "codiemb_s3",
    }
    assert [json.loads((models / f"codiemb_s1@{i}" / "train_log.json").read_text()) for i in (1, 2)] == [
        {"step": 1, "of": "codiemb_s1"},
        {"step": 2, "of": "codiemb_s1"},
    ]
    assert json.loads((models / "codiemb_s1" / "train_log.json").read_text())["steps"] == 3
    assert new_results["sets"]["S3_steps"]["ingredients"] == ["codiemb_s1@1", "codiemb_s1@2", "codiemb_s1"]
    # Retraining changes a fingerprint: a new --lr retrains the runs, and the merges are redone.
    assert fusion.main([*argv, "--lr", "2e-4"]) == 0
    assert json.loads((models / "codiemb_s1" / "run_config.json").read_text())["lr"] == 2e-4
    assert (
        _files(out / "merged")["S3_steps/delta_soup/study_merge.json"]
        != before["merged/S3_steps/delta_soup/study_merge.json"]
    )
