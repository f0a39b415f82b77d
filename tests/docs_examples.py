"""Run a documentation page's marked Python example as written (``<!-- NAME -->`` ... ``<!-- /NAME -->``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parents[1] / "docs"


def run_docs_example(page: str, name: str) -> dict[str, Any]:
    """Execute the ``python`` block between ``<!-- name -->`` markers of ``docs/page`` in the current folder.

    Returns:
        The example's namespace (its variables), for the test's assertions.
    """
    text = (DOCS / page).read_text(encoding="utf-8")
    match = re.search(rf"<!-- {name} -->\s*```python\n(.*?)```\s*<!-- /{name} -->", text, re.S)
    assert match, f"docs/{page} has no {name} block"
    namespace: dict[str, Any] = {}
    exec(compile(match.group(1), f"docs/{page} example", "exec"), namespace)
    return namespace
