"""codiemb_st.experiments (the generic layer) and benchmarks/studies/ (the two studies on it): the result store's keys
equal the ones the old study scripts wrote, the dev hold-out and dev tasks are the old ones, the training tail
resumes, the layer's imports flow one way, and the committed results regenerate."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from legacy_studies import load_legacy_script

from codiemb_st.evaluation import load_local_task
from codiemb_st.experiments import (
    DEFAULT_DEV_SEED,
    ExperimentError,
    finished_run,
    hold_out,
    merge_once,
    read_training_file,
    record_fingerprint,
    split_dev,
    weights_key,
    write_dev_tasks,
)
from codiemb_st.file_io import write_json_atomic
from studies.fusion import FUSION_DEV_SEED

pytestmark = pytest.mark.study  # end-to-end studies: a quick run skips them (-m 'not study')


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    folder = tmp_path_factory.mktemp("legacy")
    return load_legacy_script("reproduce_codiemb", folder), load_legacy_script("fusion_study", folder)


def _folder(path: Path, records: dict[str, object], weights: bytes = b"w") -> Path:
    path.mkdir(parents=True)
    for name, value in records.items():
        write_json_atomic(path / name, value)
    (path / "model.safetensors").write_bytes(weights)
    (path / "sub").mkdir()
    (path / "sub" / "model.safetensors").write_bytes(weights[::-1])
    return path


def test_record_fingerprint_equals_the_keys_the_old_scripts_wrote(legacy, tmp_path):
    old_rc, old_fusion = legacy
    run = _folder(tmp_path / "run", {"run_config.json": {"run": "codiemb", "seed": 1}, "train_log.json": {"s": 2}})
    checkpoint = _folder(tmp_path / "run@1", {"train_log.json": {"step": 1, "of": "run"}})
    soup = _folder(
        tmp_path / "soup", {"merge_config.json": {"method": "ModelSoup"}, "soup_config.json": {"ingredients": ["a"]}}
    )
    base = _folder(tmp_path / "base", {}, weights=b"base weights")
    # The reproduction fingerprinted trained runs, soups (evaluation keys) and the base; the fusion study fingerprinted
    # its ingredients (trained runs and kept checkpoints) in its merge keys.
    for folder in (run, checkpoint, soup, base):
        assert record_fingerprint(folder) == old_rc._fingerprint(folder)
    for folder in (run, checkpoint, base):
        assert record_fingerprint(folder) == old_fusion.fingerprint(folder)
    assert record_fingerprint(run) != record_fingerprint(checkpoint) != record_fingerprint(soup)
    write_json_atomic(run / "train_log.json", {"s": 3})  # retrained: a new fingerprint
    assert record_fingerprint(run) == old_rc._fingerprint(run) != old_rc._fingerprint(checkpoint)
    for length in (64, 128):
        assert weights_key(run, length) == old_fusion.content_key(run, length)
    assert weights_key(run, 64) != weights_key(run, 128) != weights_key(base, 128)
    # Equal weights, another history: one weights key, two fingerprints.
    twin = _folder(tmp_path / "twin", {"run_config.json": {"run": "other"}})
    assert weights_key(twin, 64) == weights_key(run, 64) and record_fingerprint(twin) != record_fingerprint(run)


def test_dev_hold_out_and_dev_tasks_are_the_old_ones(legacy, tmp_path):
    old_rc, old_fusion = legacy
    records = [{"query": f"q{i}", "positives": [f"p{i % 7}"], "negatives": [f"n{i}"]} for i in range(53)]
    for size in (0, 5, 30):
        assert split_dev(records, size, "file") == old_rc.split_dev(records, size, "file")
        assert split_dev(records, size, "file", DEFAULT_DEV_SEED) == split_dev(records, size, "file")
        fused = old_fusion.split_dev(records, size, "file.jsonl.gz")
        assert split_dev(records, size, "file.jsonl.gz", FUSION_DEV_SEED) == fused
    sts = {"s": [{"sentence1": "a", "sentence2": "b", "score": 1.0}, {"sentence1": "c", "sentence2": "d", "score": 3}]}
    ir = {"f": split_dev(records, 8, "f")[1], "g": records[:3]}
    new = write_dev_tasks(tmp_path / "new", "en", sts, ir)
    for label, old in (("rc", old_rc.write_dev_tasks(tmp_path / "rc", "en", sts, ir)),
                       ("fusion", old_fusion.write_dev_tasks(tmp_path / "fusion", sts, ir))):  # fmt: skip
        assert [p.name for p in new] == [p.name for p in old], label
        for a, b in zip(new, old):
            files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
            assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
            assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files), (label, a.name)
    assert load_local_task(new[1]).dataset["default"]["dev"]["queries"].num_rows == 11
    assert write_dev_tasks(tmp_path / "sts_only", "en", sts, {})[-1].name == "dev-s"  # no IR records, no IR task


def test_hold_out_reads_and_splits_files_as_both_old_scripts_did(legacy, tmp_path, monkeypatch):
    old_rc, old_fusion = legacy
    paths = []
    for name in ("a_ir", "b_ir"):
        paths.append(tmp_path / f"{name}.jsonl.gz")
        with gzip.open(paths[-1], "wt", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"query": f"{name}{i}", "positives": ["p"]}) + "\n" for i in range(40))
    train, dev = hold_out(paths, 6)
    assert list(train) == ["a_ir", "b_ir"] and all(len(dev[name]) == 6 for name in dev)
    for path in paths:
        records = old_rc.read_training_file(path)
        assert (train[path.name[:4]], dev[path.name[:4]]) == old_rc.split_dev(records, 6, path.name[:4])
    monkeypatch.setattr(old_fusion, "IR_FILES", paths[:1])
    monkeypatch.setattr(old_fusion, "STS_FILES", paths[1:])
    args = SimpleNamespace(dev_ir_records=5, dev_sts_pairs=7)
    ir, ir_dev = hold_out(paths[:1], 5, FUSION_DEV_SEED, seed_by_file_name=True)
    sts, sts_dev = hold_out(paths[1:], 7, FUSION_DEV_SEED, seed_by_file_name=True)
    assert old_fusion.load_data(args) == (ir, sts, ir_dev, sts_dev)
    assert ir_dev != hold_out(paths[:1], 5, FUSION_DEV_SEED)[1]  # the file name, not the dataset name, seeds it
    with pytest.raises(ExperimentError, match="missing.jsonl not found"):
        hold_out([*paths, tmp_path / "missing.jsonl"], 5)


def test_missing_training_file_names_the_file(tmp_path):
    with pytest.raises(ExperimentError, match=r"nope\.jsonl\.gz not found"):
        read_training_file(tmp_path / "nope.jsonl.gz")


def test_finished_runs_and_merges_are_reused_only_with_their_configuration(tmp_path):
    output = tmp_path / "run"
    assert finished_run(output, {"lr": 1}) is None
    output.mkdir()
    write_json_atomic(output / "run_config.json", {"lr": 1})
    (output / "partial.bin").write_bytes(b"x")
    assert finished_run(output, {"lr": 1}) is None and not output.exists()  # no done marker: cleared
    output.mkdir()
    write_json_atomic(output / "run_config.json", {"lr": 1})
    write_json_atomic(output / "train_log.json", {"steps": 3})
    assert finished_run(output, {"lr": 1}) == {"steps": 3}
    assert finished_run(output, {"lr": 2}) is None and not output.exists()

    class Recorder:
        calls = 0

        def merge_to_folder(self, ingredients, folder, base_model, show_progress_bar):
            Recorder.calls += 1
            folder.mkdir(parents=True)
            (folder / "model.safetensors").write_bytes(b"m")

    merged = tmp_path / "merged"
    for record in ({"a": 1}, {"a": 1}, {"a": 2}):
        assert merge_once(Recorder(), [], "base", merged, "soup_config.json", record) == record
    assert Recorder.calls == 2 and json.loads((merged / "soup_config.json").read_text()) == {"a": 2}


def test_the_library_never_imports_experiments():
    root = Path(__file__).resolve().parents[2]

    def imports(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    library = [p for p in (root / "codiemb_st").rglob("*.py") if "experiments" not in p.parts]
    assert library and not [p for p in library if any(m.startswith("codiemb_st.experiments") for m in imports(p))]
    experiments = list((root / "codiemb_st" / "experiments").glob("*.py"))
    assert not [p for p in experiments if any(m.startswith("codiemb_st.cli") for m in imports(p))]
    # The generic layer knows no study: the studies (benchmarks/studies/) import it, never the reverse.
    lab = ("studies", "measurement", "argparse")
    assert not [p for p in experiments if any(m.split(".")[0] in lab for m in imports(p))]
    assert all(len(p.read_text("utf-8").splitlines()) <= 500 for p in experiments)


RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"


FUSION_RESULTS = sorted(path.parent.name for path in (RESULTS / "fusion").glob("*/results.json"))


def test_the_committed_fusion_results_are_found():
    assert {"en", "reproduction-en", "reproduction-zh", "reproduction-en-new-methods"} <= set(FUSION_RESULTS)


@pytest.mark.parametrize("folder", FUSION_RESULTS)
def test_committed_fusion_reports_regenerate_from_their_results(folder):
    from studies.fusion_study import report

    results = json.loads((RESULTS / "fusion" / folder / "results.json").read_text("utf-8"))
    assert report(results) == (RESULTS / "fusion" / folder / "results.md").read_text("utf-8")


@pytest.mark.parametrize("name", ["en", "zh"])
def test_committed_reproduction_claims_means_and_report_regenerate_from_their_scores(name):
    # The committed results.json holds every score; the claims (seed pairing and the claim rule), the means over
    # seeds and the whole results.md must follow from them with the study's code.
    from studies.reproduction import make_track
    from studies.reproduction_study import claims, report, seed_means

    summary = json.loads((RESULTS / name / "results.json").read_text("utf-8"))

    def kind(task: str) -> str:
        return "retrieval" if task.endswith("Retrieval") or task in ("SciFact", "dev-ir") else "sts"

    results = {
        label: {
            int(seed): {
                "scores": scores,
                "types": {t: kind(t) for t in scores},
                "geometry": summary["geometry"][label][seed],
            }
            for seed, scores in by_seed.items()
        }
        for label, by_seed in summary["scores"].items()
    }
    tasks = {
        split: [
            SimpleNamespace(name=task, type=kind(task), corpus_subsample=summary["corpus_subsample"].get(task))
            for task in (Path(ref).name for ref in summary["evaluation"][split])
        ]
        for split in ("test", "dev")
    }
    for split, split_tasks in tasks.items():
        names = [task.name for task in split_tasks]
        assert claims(results, names) == summary["claims"][split]
        assert seed_means(results, names) == summary["means"][split]
    meta = {
        "seconds": summary["wall_seconds"],
        "machine": summary["machine"],
        "command": summary["command"],
        "sampled": summary["sts_samples"],
        "budget": summary["budget"]["name"],
        "steps_per_task": summary["budget"]["steps_per_task"],
        "training_minutes": sum(log["seconds"] for by in summary["training"].values() for log in by.values()) / 60,
        "evaluation_minutes": sum(s for by in summary["evaluation_seconds"].values() for s in by.values()) / 60,
    }
    text = report(make_track(name), results, tasks["test"], tasks["dev"], meta)
    assert text == (RESULTS / name / "results.md").read_text("utf-8")
