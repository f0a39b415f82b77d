"""The package's shape: no import circle, thin scripts, the shipped files, one definition of each aggregate."""

from __future__ import annotations

import ast
import gzip
import json
from pathlib import Path

import pytest

from codiemb_st.evaluation import aggregate_main_scores, load_local_task, write_retrieval_task, write_sts_task
from codiemb_st.file_io import json_safe, read_jsonl, write_json_atomic
from codiemb_st.validation import check_finite_float, check_positive_int

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE = REPO_ROOT / "codiemb_st"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """Edges module -> codiemb_st module it imports, at any depth (function-level and TYPE_CHECKING imports too)."""
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
                targets = [
                    f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules else node.module
                    for alias in node.names
                ]
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # A package's __init__ re-exporting its own submodules is how Python packages work, not a circle.
            if node.startswith(nxt + ".") and nxt != "codiemb_st" or nxt.startswith(node + "."):
                continue
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_circle_in_the_package():
    graph = _import_graph()
    assert graph["codiemb_st.merging.base"] >= {"codiemb_st.merging.streaming_merge"}
    families = [
        f"codiemb_st.merging.{f}" for f in ("soup", "delta_soup", "model_stock", "ties", "spherical", "cocktail")
    ]
    assert all(graph[f] >= {"codiemb_st.merging.base"} for f in families)
    assert _find_cycle(graph) is None, " -> ".join(_find_cycle(graph))
    # The shared merge math is pure; the streaming I/O knows no method.
    assert graph["codiemb_st.merging.tensor_math"] == set()
    assert not {"codiemb_st.merging.base", *families} & graph["codiemb_st.merging.streaming_merge"]
    # The STS terms' math and the epoch plan are pure: no other project module.
    assert graph["codiemb_st.losses.sts_terms"] == set()
    assert graph["codiemb_st.epoch_plan"] == set()


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_benchmark_scripts_are_thin_and_import_no_sibling():
    scripts = {path.stem for path in (REPO_ROOT / "benchmarks").glob("*.py")}
    for path in (REPO_ROOT / "benchmarks").glob("*.py"):
        text = path.read_text(encoding="utf-8")
        assert "sys.path" not in text, f"{path.name} edits sys.path"
        imported = {
            alias.name.split(".")[0]
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.Import)
            for alias in node.names
        } | {
            node.module.split(".")[0]
            for node in ast.walk(ast.parse(text))
            if isinstance(node, ast.ImportFrom) and node.module
        }
        assert not imported & (scripts - {path.stem}), f"{path.name} imports another benchmark script"


def _imports(path: Path) -> list[tuple[int, str, str | None]]:
    """``(line, module, name)`` of every import in ``path`` (``name`` is None for ``import module``)."""
    found: list[tuple[int, str, str | None]] = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
    return found


def test_lab_code_lives_with_the_scripts_not_in_the_package():
    # benchmarks/measurement (measurement helpers) and benchmarks/studies (the concrete studies) are imported by the
    # scripts and the tests, never by the installed package; they import no script; and, in the underscore rule's
    # spirit, no underscored module or name crosses a module boundary anywhere in benchmarks/.
    benchmarks = REPO_ROOT / "benchmarks"
    lab = {path.parent.name for path in benchmarks.glob("*/__init__.py")}
    assert lab == {"measurement", "studies"}
    assert not (PACKAGE / "benchmarking").exists()
    generic = {
        "__init__",
        "errors",
        "held_out",
        "seeds",
        "store",
        "training",
    }  # the studies live in benchmarks/studies
    assert {path.stem for path in (PACKAGE / "experiments").glob("*.py")} == generic
    package_imports = [(p, m) for p in PACKAGE.rglob("*.py") for _, m, _ in _imports(p) if m.split(".")[0] in lab]
    assert package_imports == []
    scripts = {path.stem for path in benchmarks.glob("*.py")}
    problems = []
    for path in sorted(benchmarks.rglob("*.py")):
        inside = path.parent != benchmarks
        for line, module, name in _imports(path):
            where = f"{path.relative_to(REPO_ROOT)}:{line}"
            top = module.split(".")[0]
            if inside and top in scripts:
                problems.append(f"{where}: imports the script {module}")
            if top not in lab | {"codiemb_st"}:
                continue
            parts = [*module.split("."), *([name] if name else [])]
            private = [part for part in parts if part.startswith("_") and not part.startswith("__")]
            if private:
                problems.append(f"{where}: {'.'.join(parts)} crosses a module boundary")
    assert problems == []


def test_shipped_files():
    assert (PACKAGE / "py.typed").is_file()
    license_text = (REPO_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in license_text and "Version 2.0" in license_text and "END OF TERMS" in license_text


def test_aggregates_have_one_definition():
    scores = {"A": 0.8, "B": 0.4, "R": 0.7}
    types = {"A": "sts", "B": "sts", "R": "retrieval"}
    summary = aggregate_main_scores(scores, types)
    assert summary == pytest.approx(
        {"sts_mean": 0.6, "retrieval_mean": 0.7, "mean_task_type": 0.65, "mean_task": 1.9 / 3}
    )
    with pytest.raises(ValueError, match="No task type"):
        aggregate_main_scores({"X": 1.0}, {})


def test_task_folder_writers_round_trip(tmp_path):
    pairs = [("a cat sits", "a kitten sits", 4.5), {"sentence1": "x y", "sentence2": "z w", "score": 1.0}]
    folder = write_sts_task(tmp_path / "MySTS", pairs, language="en", metadata={"note": "n"})
    meta = json.loads((folder / "task.json").read_text())
    assert meta["name"] == "MySTS" and (meta["min_score"], meta["max_score"]) == (1.0, 4.5) and meta["note"] == "n"
    data = load_local_task(folder).dataset["default"]["test"]
    assert data["score"] == [4.5, 1.0]
    corpus = {"d1": ("T", "text one"), "d2": "text two"}
    folder = write_retrieval_task(tmp_path / "MyIR", corpus, {"q1": "query"}, {"q1": {"d1": 2}}, split="dev")
    split = load_local_task(folder).dataset["default"]["dev"]
    assert split["relevant_docs"] == {"q1": {"d1": 2}} and split["corpus"]["title"] == ["T", ""]
    # Rewriting replaces a task folder; anything else at the path is refused.
    write_sts_task(tmp_path / "MySTS", pairs[:1] * 3)
    assert len(load_local_task(tmp_path / "MySTS").dataset["default"]["test"]) == 3
    (tmp_path / "other").mkdir()
    with pytest.raises(FileExistsError, match="not a task folder"):
        write_sts_task(tmp_path / "other", pairs)
    with pytest.raises(ValueError, match="not in `corpus`"):
        write_retrieval_task(tmp_path / "bad", corpus, {"q1": "q"}, {"q1": {"d9": 1}})
    with pytest.raises(ValueError, match=r"pairs\[0\].score"):
        write_sts_task(tmp_path / "nan", [("a", "b", float("nan"))])
    assert not (tmp_path / "bad").exists() and not (tmp_path / "nan").exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_one_jsonl_reader_names_file_and_line(tmp_path):
    good = tmp_path / "a.jsonl.gz"
    good.write_bytes(gzip.compress(b'{"a": 1}\n\n{"a": 2}\n'))
    assert [(loc.rsplit(":", 1)[1], v) for loc, v in read_jsonl(good)] == [("1", {"a": 1}), ("3", {"a": 2})]
    fake = tmp_path / "b.jsonl.gz"
    fake.write_text('{"a": 1}\n')
    with pytest.raises(ValueError, match="not gzip"):
        list(read_jsonl(fake))
    latin = tmp_path / "c.jsonl"
    latin.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"c.jsonl:2: the file is not UTF-8"):
        list(read_jsonl(latin))
    broken = tmp_path / "d.jsonl"
    broken.write_text('{"a": 1}\n{"a": \n')
    with pytest.raises(ValueError, match=r"d.jsonl:2: invalid JSON"):
        list(read_jsonl(broken))
    with pytest.raises(FileNotFoundError):
        list(read_jsonl(tmp_path / "missing.jsonl"))


def test_json_writer_is_atomic_and_finite(tmp_path):
    path = write_json_atomic(tmp_path / "sub" / "x.json", {"inf": float("inf"), "v": [1.5, float("nan")]})
    assert json.loads(path.read_text()) == {"inf": None, "v": [1.5, None]}
    assert json_safe((1.0, float("-inf"))) == [1.0, None]

    class Boom:
        def __str__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_json_atomic(tmp_path / "sub" / "x.json", {"bad": Boom()})
    assert json.loads(path.read_text())["v"] == [1.5, None]  # the old file survives a failed write
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["x.json"]


def test_argument_checks_share_one_rule():
    assert check_positive_int("n", 3) == 3
    for bad, kind in ((0, ValueError), (True, TypeError), (2.0, TypeError), ("2", TypeError)):
        with pytest.raises(kind, match="`n`"):
            check_positive_int("n", bad)
    assert check_finite_float("t", 1) == 1.0
    for bad, kind in ((float("nan"), ValueError), (float("inf"), ValueError), (False, TypeError), (None, TypeError)):
        with pytest.raises(kind, match="`t`"):
            check_finite_float("t", bad)
    with pytest.raises(ValueError, match="> 0"):
        check_finite_float("t", 0.0, minimum=0.0, strict_minimum=True)
