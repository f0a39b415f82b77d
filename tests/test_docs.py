"""The documentation site builds offline in strict mode: a broken link, anchor, docstring reference or a page left
out of the navigation fails (mkdocs.yml sets strict validation; the tools come with the `docs` and `dev` extras)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _quick_example(path: Path) -> str:
    text = path.read_text(encoding="utf-8")
    match = re.search(r"<!-- quick-example -->\s*```\w*\n(.*?)```\s*<!-- /quick-example -->", text, flags=re.S)
    assert match, f"{path.name} has no <!-- quick-example --> block"
    return match.group(1)


def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONPATH": str(REPO_ROOT)}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    site = tmp_path / "site"
    # The API reference is generated from the docstrings, not just an empty page per module.
    api = (site / "api" / "losses" / "index.html").read_text(encoding="utf-8")
    assert "mini_batch_size" in api and "PearsonSpearmanLoss" in api
    for page in ("quick-start", "your-own-data", "merging", "results/reproduction", "results/measured-numbers"):
        assert (site / page / "index.html").is_file(), page


def test_docs_and_readme_quick_examples_are_the_same():
    assert _quick_example(REPO_ROOT / "docs" / "quick-start.md") == _quick_example(REPO_ROOT / "README.md")


def test_readme_links_into_the_docs_resolve():
    text = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    targets = re.findall(r"\]\((docs/[^)#\s]+)", text)
    assert targets, "README links to no docs page"
    missing = [target for target in targets if not (REPO_ROOT / target).is_file()]
    assert not missing, missing
