"""The command-line page's option lists, from the parser: ``docs/cli.md`` carries every subcommand's ``--help``
between ``<!-- cli-help-all -->`` and ``<!-- /cli-help-all -->`` in its Markdown source (readable on GitHub or in
an editor, not only on the built site).

``python docs/hooks/cli_help.py`` rewrites that block from the parser; as an MkDocs hook this module refuses to
build a page whose block differs from the parser (run the command), and ``tests/test_docs.py`` checks the same, so
the page cannot drift from the options. Building the parser imports neither torch nor mteb.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

START, END = "<!-- cli-help-all -->", "<!-- /cli-help-all -->"
REPO_ROOT = Path(__file__).resolve().parents[2]
CLI_PAGE = REPO_ROOT / "docs" / "cli.md"


def help_texts() -> dict[str, str]:
    """``{"": top-level help, command: its help}``, wrapped at 110 columns whatever the terminal."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from codiemb_st.cli import build_parser

    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "110"  # argparse wraps to the terminal width; fix it so the page is the same everywhere
    try:
        parser = build_parser()
        subparsers = next(action for action in parser._actions if action.choices and action.dest == "command")
        texts = {"": parser.format_help()}
        texts.update({name: sub.format_help() for name, sub in subparsers.choices.items()})
    finally:
        if previous is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = previous
    return texts


def options_block() -> str:
    """The Markdown between the markers: a heading and the ``--help`` of every subcommand."""
    sections = [
        f"### `codiemb-st {name}`\n\n```text\n{text.rstrip()}\n```" for name, text in help_texts().items() if name
    ]
    return "\n\n".join(sections)


def committed_block(markdown: str) -> str | None:
    """The block between the markers in ``markdown`` (``None`` without markers)."""
    if START not in markdown or END not in markdown:
        return None
    return markdown.split(START, 1)[1].split(END, 1)[0].strip("\n")


def write_page(path: Path = CLI_PAGE) -> bool:
    """Rewrite the block in ``path`` from the parser; returns whether the page changed."""
    markdown = path.read_text(encoding="utf-8")
    if committed_block(markdown) is None:
        raise ValueError(f"{path}: no {START} ... {END} block to fill.")
    before, rest = markdown.split(START, 1)
    after = rest.split(END, 1)[1]
    updated = f"{before}{START}\n{options_block()}\n{END}{after}"
    if updated != markdown:
        path.write_text(updated, encoding="utf-8")
    return updated != markdown


def on_page_markdown(markdown, page, config, files, **kwargs):
    block = committed_block(markdown)
    if block is not None and block != options_block():
        raise ValueError(
            f"{page.file.src_path}: the option lists differ from the parser; run `python docs/hooks/cli_help.py`."
        )
    return markdown.replace(START, "").replace(END, "")


if __name__ == "__main__":
    print("docs/cli.md " + ("updated" if write_page() else "already up to date"))
