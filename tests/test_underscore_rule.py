"""The underscore rule (mteb's, in CONTRIBUTING.md): an underscored module is imported only inside its own package,
and an underscored name never crosses modules. Read from the package's import statements."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "codiemb_st"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    relative = Path(*name.split("."))
    return (PACKAGE.parent / relative).with_suffix(".py").is_file() or (PACKAGE.parent / relative).is_dir()


def _private(part: str) -> bool:
    return part.startswith("_") and not part.startswith("__")


def violations(root: Path = PACKAGE) -> list[str]:
    """Every import in ``root`` that breaks the rule, as ``path:line: what``."""
    found = []
    for path in sorted(root.rglob("*.py")):
        importer = _module_name(path)
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("codiemb_st"):
                targets = [(node.module, None)] + [(node.module, alias.name) for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [(alias.name, None) for alias in node.names if alias.name.startswith("codiemb_st")]
            else:
                continue
            for module, name in targets:
                # `from pkg import _mod` names a module: judge it as one.
                if name is not None and _is_module(f"{module}.{name}"):
                    module, name = f"{module}.{name}", None
                parts = module.split(".")
                for index, part in enumerate(parts):
                    owner = ".".join(parts[:index])
                    if _private(part) and not (package == owner or package.startswith(owner + ".")):
                        found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {module} outside {owner}")
                if name is not None and _private(name):
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {name} from {module}")
    return found


def test_no_private_module_or_name_crosses_its_boundary():
    assert violations() == []


def test_the_checker_finds_both_kinds(tmp_path):
    package = tmp_path / "codiemb_st"
    (package / "inner").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "inner" / "__init__.py").write_text("")
    (package / "inner" / "_hidden.py").write_text("def _helper(): ...\n")
    (package / "inner" / "user.py").write_text("from codiemb_st.inner import _hidden\n")  # inside: fine
    (package / "outside.py").write_text(
        "from codiemb_st.inner import _hidden\nfrom codiemb_st.inner._hidden import _helper\n"
    )
    global PACKAGE
    saved, PACKAGE = PACKAGE, package
    try:
        found = violations(package)
    finally:
        PACKAGE = saved
    assert any("outside.py:1: codiemb_st.inner._hidden outside codiemb_st.inner" in item for item in found)
    assert any("outside.py:2: _helper from codiemb_st.inner._hidden" in item for item in found)
    assert not any("user.py" in item for item in found)
