"""The ``codiemb-st`` command line: eval (main job, resume), merge (every method from the shell), train, wrappers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evaluation_fixtures import reference_sts_spearman, tiny_eval_argv, write_tiny_tasks
from safetensors.torch import load_file

from codiemb_st.cli import UsageError, build_parser, main
from codiemb_st.cli import eval_command as eval_cli
from codiemb_st.evaluation import CMTEB_TASK_NAMES, runner
from codiemb_st.merging import DeltaSoup, TaskArithmetic

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return write_tiny_tasks(tmp_path_factory.mktemp("cli_tasks"))


def _eval_argv(model: Path, data_dir: Path, out: Path) -> list[str]:
    return tiny_eval_argv(model, data_dir, out, "--tasks", "auto", "--geometry-samples", "20")


def test_eval_end_to_end_on_tiny_local_data(data_dir, tiny_model_path, tmp_path, capsys):
    out = tmp_path / "results"
    assert main(_eval_argv(tiny_model_path, data_dir, out)) == 0
    printed = capsys.readouterr().out
    table = (out / "results.md").read_text(encoding="utf-8")
    assert table in printed
    for row in ("| TinySTS | sts | test |", "| TinyRetrieval † | retrieval |", "**mean (task)**", "anisotropy"):
        assert row in table
    assert "**mean (task type)**" in table and "**sts mean**" in table
    result = json.loads((out / "tiny" / "TinySTS.json").read_text())
    assert result["task_name"] == "TinySTS" and "cosine_spearman" in result["scores"]["test"][0]
    marked = json.loads((out / "tiny" / "TinyRetrieval.json").read_text())["scores"]["test"][0]
    assert marked["corpus_subsample"]["documents_kept"] == 8
    run = json.loads((out / "run.json").read_text())
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(tiny_model_path), device="cpu")  # the very model the CLI evaluated
    assert run["scores"]["tiny"]["TinySTS"] == pytest.approx(reference_sts_spearman(model), abs=1e-6)
    assert f"{run['scores']['tiny']['TinySTS'] * 100:.2f}" in table
    assert set(run["scores"]["tiny"]) >= {"mean_task", "mean_task_type", "sts_mean", "retrieval_mean"}
    assert set(run["geometry"]["tiny"]) >= {"anisotropy", "effective_rank", "alignment"}
    assert (out / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert not list(out.rglob("*.tmp"))


class _Interrupted(Exception):
    pass


def test_eval_resumes_finished_tasks_and_redoes_changed_ones(data_dir, tiny_model_path, tmp_path, monkeypatch):
    out = tmp_path / "results"
    evaluated: list[str] = []
    interrupt = {"TinyRetrieval"}
    real = runner._evaluate_one

    def counting(model, prepared, *args):
        evaluated.append(prepared.name)
        if prepared.name in interrupt:
            interrupt.clear()
            raise _Interrupted  # the first run dies during this task
        return real(model, prepared, *args)

    monkeypatch.setattr(runner, "_evaluate_one", counting)
    argv = [*_eval_argv(tiny_model_path, data_dir, out), "--no-geometry", "--no-plot"]
    with pytest.raises(_Interrupted):
        main(argv)
    first_tasks = sorted(p.name for p in (out / "tiny").glob("*.json"))
    assert first_tasks and not any(name.startswith("TinyRetrieval") for name in first_tasks)  # nothing half-written
    finished = [name.removesuffix(".key.json") for name in first_tasks if name.endswith(".key.json")]
    evaluated.clear()
    assert main(argv) == 0
    # The rerun evaluates only what the interrupted run had not finished.
    assert sorted(set(evaluated)) == sorted({"STSBenchmark", "SciFact", "TinySTS", "TinyRetrieval"} - set(finished))
    evaluated.clear()
    assert main(argv) == 0
    assert evaluated == []  # everything finished: nothing evaluated again
    assert main([*argv, "--corpus-cap", "9"]) == 0  # another subsample: retrieval tasks are redone, STS reused
    assert sorted(evaluated) == ["SciFact", "TinyRetrieval"]
    evaluated.clear()
    assert main([*argv, "--no-resume"]) == 0
    assert len(evaluated) == 4


def test_eval_without_data_fails_cleanly(tmp_path, capsys, monkeypatch):
    # No folder is searched: even with a shared/data/eval right here, eval without --data-dir asks for it.
    (tmp_path / "shared" / "data" / "eval").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--models", str(tmp_path), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--data-dir was not given" in err and "Traceback" not in err
    assert main(["eval", "--data-dir", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):
        main(["eval", "--batch-size", "0"])
    assert "positive integer" in capsys.readouterr().err


def test_cmteb_preset_skips_tasks_without_data_offline(data_dir):
    parser = build_parser()  # conftest runs the tests offline (HF_HUB_OFFLINE=1): hub loads fail at once
    args = parser.parse_args(["eval", "--tasks", "cmteb", "TinySTS", "--data-dir", str(data_dir)])
    prepared, skipped = eval_cli.prepare(args, data_dir)
    assert [t.name for t in prepared] == ["TinySTS"] and list(skipped) == list(CMTEB_TASK_NAMES)
    args = parser.parse_args(["eval", "--tasks", "STSB", "--data-dir", str(data_dir)])
    with pytest.raises(UsageError, match="Could not load task 'STSB'"):
        eval_cli.prepare(args, data_dir)


@pytest.fixture(scope="module")
def merge_inputs(tmp_path_factory):
    from tiny_model import save_perturbed_tiny_model, save_tiny_model

    root = tmp_path_factory.mktemp("merge_cli")
    base = save_tiny_model(root / "base", seed=0)
    checkpoints = []
    for index in range(2):
        checkpoints.append(save_perturbed_tiny_model(root / f"ckpt{index}", perturbation_seed=index))
    return base, checkpoints


def _merged_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(next(folder.rglob("model.safetensors")))


def test_merge_from_the_shell_equals_the_python_api(merge_inputs, tmp_path):
    base, checkpoints = merge_inputs
    argv = ["merge", *map(str, checkpoints), "--base-model", str(base), "--no-progress"]
    options = ["--method", "delta_soup", "--power", "2", "--granularity", "row"]
    assert main([*argv, *options, "--output", str(tmp_path / "cli")]) == 0
    expected = DeltaSoup(power=2, granularity="row").merge_to_folder(
        checkpoints, tmp_path / "api", base_model=base, show_progress_bar=False
    )
    cli, api = _merged_tensors(tmp_path / "cli"), _merged_tensors(expected)
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    config = json.loads((tmp_path / "cli" / "merge_config.json").read_text())
    assert config["method"] == "DeltaSoup" and config["parameters"]["granularity"] == "row"
    assert main([*argv, "--method", "task_arithmetic", "--scale", "0.5", "--output", str(tmp_path / "ta")]) == 0
    expected = TaskArithmetic(scale=0.5).merge_to_folder(
        checkpoints, tmp_path / "ta_api", base_model=base, show_progress_bar=False
    )
    cli, api = _merged_tensors(tmp_path / "ta"), _merged_tensors(expected)
    assert all(torch.equal(cli[k], api[k]) for k in cli)


def test_merge_cli_offers_the_fusion_methods_and_boolean_options(merge_inputs, tmp_path):
    from codiemb_st.merging import TIES, ModelStock

    base, checkpoints = merge_inputs
    argv = ["merge", *map(str, checkpoints), "--base-model", str(base), "--no-progress"]
    cases = [
        (["--method", "ties", "--density", "0.3", "--scale", "0.9"], TIES(density=0.3, scale=0.9)),
        (["--method", "model_stock"], ModelStock()),
        (
            ["--method", "delta_soup", "--sign-consensus", "--no-rescale"],
            DeltaSoup(sign_consensus=True),
        ),  # plain flags
    ]
    for index, (extra, method) in enumerate(cases):
        assert main([*argv, *extra, "--output", str(tmp_path / f"cli{index}")]) == 0
        expected = method.merge_to_folder(
            checkpoints, tmp_path / f"api{index}", base_model=base, show_progress_bar=False
        )
        cli, api = _merged_tensors(tmp_path / f"cli{index}"), _merged_tensors(expected)
        assert all(torch.equal(cli[k], api[k]) for k in cli)
        config = json.loads((tmp_path / f"cli{index}" / "merge_config.json").read_text())
        assert config["parameters"] == method.get_config_dict()
    with pytest.raises(SystemExit):
        main([*argv, "--method", "delta_soup", "--sign-consensus", "maybe", "--output", str(tmp_path / "bad")])


def test_merge_cli_refuses_bad_options_and_leaves_nothing(merge_inputs, tmp_path, capsys):
    base, checkpoints = merge_inputs
    paths = list(map(str, checkpoints))
    out = tmp_path / "deep" / "er" / "out"
    cases = [
        (["--method", "model_soup", "--power", "2"], "does not take --power"),
        (["--method", "delta_soup"], "needs --base-model"),
        (["--base-model", str(base), "--method", "delta_soup", "--power", "-1"], "power"),
        (["--base-model", str(tmp_path / "missing")], "is not a model folder"),
    ]
    for extra, message in cases:
        assert main(["merge", *paths, *extra, "--output", str(out), "--no-progress"]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "deep").exists()  # no output and no empty parent folders
    with pytest.raises(SystemExit):
        main(["merge", *paths, "--granularity", "column", "--output", str(out)])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_help_imports_neither_torch_nor_mteb_and_is_plain_text():
    # A subprocess: what building the parser and printing each subcommand's help imports, and the help text. `merge`
    # reads its options from the merge methods' classes, so its --help alone imports torch (measured: docs/cli.md).
    script = (
        "import contextlib, io, json, sys\n"
        "from codiemb_st.cli import COMMANDS, main\n"
        "heavy = ('torch', 'mteb', 'transformers', 'sentence_transformers', 'datasets')\n"
        "texts, loaded = {}, {}\n"
        "for command in ['', *(c for c in COMMANDS if c != 'merge'), 'merge']:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):\n"
        "        main([command, '--help'] if command else ['--help'])\n"
        "    texts[command] = out.getvalue()\n"
        "    loaded[command] = sorted(m for m in sys.modules if m.split('.')[0] in heavy)\n"
        "print(json.dumps({'loaded': loaded, 'texts': texts}))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True, cwd=REPO_ROOT
    )
    result = json.loads(done.stdout)
    assert all(loaded == [] for command, loaded in result["loaded"].items() if command != "merge")
    assert "torch" in result["loaded"]["merge"] and "mteb" not in result["loaded"]["merge"]
    for command, text in result["texts"].items():
        assert f"usage: codiemb-st {command}".rstrip() in text
        assert "``" not in text and ":class:" not in text and ":mod:" not in text and ":data:" not in text
    from codiemb_st.merging import MERGE_METHODS

    needs_base = sorted(name for name, method in MERGE_METHODS.items() if method.requires_base)
    help_text = " ".join(result["texts"]["merge"].split())
    assert f"needed by {', '.join(needs_base)}" in help_text and "ties" in needs_base


def test_merge_options_are_the_constructors_parameters():
    # One source: the CLI reads each registered method's constructor (no source parsing, no second table).
    import inspect

    from codiemb_st.cli.merge_command import method_options
    from codiemb_st.merging import MERGE_METHODS, TIES, DeltaSoup, MultiSLERP

    for method in MERGE_METHODS.values():
        signature = inspect.signature(method.__init__).parameters.values()
        parameters = [
            p.name for p in signature if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        ]
        assert list(method_options(method)) == parameters
    delta = method_options(DeltaSoup)
    assert delta["granularity"].choices == ("element", "row", "tensor") and delta["power"].default == 1.0
    assert delta["sign_consensus"].kind == "bool" and method_options(TIES)["density"].kind == "float"
    assert method_options(MultiSLERP)["weights"].several


def test_unreachable_hub_model_fails_in_one_line(tmp_path, monkeypatch):
    ir, _ = _train_files(tmp_path)
    argv = ["-m", "codiemb_st", "train", "--ir", str(ir), "--model", "nobody/no-such-model", "--output-dir", "o"]
    env = {**__import__("os").environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --model 'nobody/no-such-model' is not a local folder nor in the Hugging Face cache, and "
        "HF_HUB_OFFLINE is set: pass a local model folder (or unset HF_HUB_OFFLINE to download it)."
    ]
    # Online but no route to the hub: one line too (a closed local port stands in for the hub).
    from codiemb_st.cli.model_source import check_model_source

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    for variable in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(UsageError, match=r"--model 'nobody/no-such-model' .*cannot be reached \(no network\?\)"):
        check_model_source("nobody/no-such-model", "--model")
    with pytest.raises(UsageError, match="no such model folder"):
        check_model_source(str(tmp_path / "missing"), "--model")


def test_help_of_every_subcommand_and_the_wrappers():
    for command in ("eval", "merge", "train"):
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
    for script, command in (("run_mteb.py", "eval"), ("train_codiemb.py", "train")):
        done = subprocess.run(
            [sys.executable, str(REPO_ROOT / "benchmarks" / script), "--help"],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert f"usage: codiemb-st {command}" in done.stdout
    done = subprocess.run(
        [sys.executable, "-m", "codiemb_st", "merge", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and "--base-model" in done.stdout


def test_console_script_is_declared():
    import tomllib

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["scripts"] == {"codiemb-st": "codiemb_st.cli:main"}


def _train_files(tmp_path: Path) -> tuple[Path, Path]:
    ir = tmp_path / "ir.jsonl"
    ir.write_text(
        "\n".join(json.dumps({"query": f"q {i}", "positives": [f"p {i}"], "negatives": [f"n {i}"]}) for i in range(8))
    )
    sts = tmp_path / "sts.jsonl"
    sts.write_text(
        "\n".join(json.dumps({"sentence1": f"a {i}", "sentence2": f"b {i}", "score": float(i % 5)}) for i in range(8))
    )
    return ir, sts


@pytest.mark.parametrize("task", ["ir", "sts"])
def test_train_one_task_alone_uses_exactly_the_files_given(task, tiny_model_path, tmp_path, monkeypatch, capsys):
    # A shared/data/train here must not be picked up: the run trains on the one file named.
    train_dir = tmp_path / "shared" / "data" / "train"
    train_dir.mkdir(parents=True)
    ir, sts = _train_files(tmp_path)
    (train_dir / "en_stsb.jsonl.gz").write_bytes(b"not read")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_model_path), f"--{task}", str(ir if task == "ir" else sts)]
    argv += ["--output-dir", str(out), "--max-steps", "1", "--ir-batch-size", "4", "--sts-batch-size", "4"]
    assert main(argv) == 0
    assert "Trained 1 optimizer steps" in capsys.readouterr().out
    assert (out / "final" / "modules.json").is_file()


def test_trained_model_card_names_the_losses_and_their_citation(tiny_model_path, tmp_path):
    # sentence-transformers writes final/README.md from the trainer's card data: the losses with their parameters
    # (as tags and in the body) and each loss's `citation`, the CoDiEmb paper.
    from huggingface_hub import ModelCard

    ir, sts = _train_files(tmp_path)
    argv = ["train", "--model", str(tiny_model_path), "--ir", str(ir), "--sts", str(sts), "--max-steps", "1"]
    argv += ["--output-dir", str(tmp_path / "run"), "--ir-batch-size", "4", "--sts-batch-size", "4"]
    assert main(argv) == 0
    card = ModelCard.load(tmp_path / "run" / "final" / "README.md")
    assert card.data.library_name == "sentence-transformers"
    assert {"loss:MultiPositiveCachedInfoNCELoss", "loss:PearsonSpearmanLoss"} <= set(card.data.tags)
    assert "#### MultiPositiveCachedInfoNCELoss and PearsonSpearmanLoss" in card.text
    assert "@misc{zhang2025codiemb" in card.text and "arxiv.org/abs/2508.11442" in card.text


def test_train_without_data_or_with_zero_steps_is_refused(tmp_path, capsys):
    assert main(["train", "--output-dir", str(tmp_path / "run")]) == 2
    assert "No training data: pass --ir and/or --sts" in capsys.readouterr().err
    ir, _ = _train_files(tmp_path)
    with pytest.raises(SystemExit):
        main(["train", "--ir", str(ir), "--output-dir", str(tmp_path / "run"), "--max-steps", "0"])
    assert "--max-steps: expected a positive integer, got '0'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_shared_data_lookup_is_the_checkouts_only(tmp_path, monkeypatch):
    from codiemb_st import shared_data

    (tmp_path / "shared" / "data" / "eval").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)  # a shared/data in the current folder is not searched
    monkeypatch.delenv(shared_data.ENV_VARIABLE, raising=False)
    monkeypatch.setattr(shared_data, "_CHECKOUT", tmp_path / "site-packages")  # an installed package
    assert shared_data.find_shared_data() is None


def _script(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_{name}_under_test", REPO_ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_repository_scripts_pass_the_shared_data_explicitly(tmp_path, monkeypatch, capsys):
    shared = tmp_path / "shared" / "data"
    (shared / "eval").mkdir(parents=True)
    (shared / "train").mkdir()
    run_mteb, train_codiemb = _script("run_mteb"), _script("train_codiemb")
    for script in (run_mteb, train_codiemb):
        monkeypatch.setattr(script, "shared_data_path", lambda *parts: shared.joinpath(*parts))
    assert run_mteb.eval_argv([]) == ["eval", "--data-dir", str(shared / "eval")]
    assert run_mteb.eval_argv(["--data-dir", "mine"]) == ["eval", "--data-dir", "mine"]  # an explicit one wins
    argv = train_codiemb.train_argv(["--output-dir", "run"])
    assert argv[:2] == ["train", "--ir"] and str(shared / "train" / "en_stsb.jsonl.gz") in argv
    assert "training on the demo files" in capsys.readouterr().out  # the demo default is printed
    assert train_codiemb.train_argv(["--sts", "s.jsonl", "--output-dir", "run"]) == [
        "train",
        "--sts",
        "s.jsonl",
        "--output-dir",
        "run",
    ]


def test_merge_defaults_to_model_soup(merge_inputs, tmp_path):
    # The evidence's choice (README "Fusion study"): no base model needed, the uniform average of the checkpoints.
    from codiemb_st.merging import ModelSoup

    _, checkpoints = merge_inputs
    assert main(["merge", *map(str, checkpoints), "--no-progress", "--output", str(tmp_path / "cli")]) == 0
    expected = ModelSoup().merge_to_folder(checkpoints, tmp_path / "api", show_progress_bar=False)
    cli, api = _merged_tensors(tmp_path / "cli"), _merged_tensors(expected)
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)
    assert json.loads((tmp_path / "cli" / "merge_config.json").read_text())["method"] == "ModelSoup"
