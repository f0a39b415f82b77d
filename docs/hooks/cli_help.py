"""MkDocs hook: ``<!-- cli-help COMMAND -->`` in a page becomes that subcommand's ``--help``, and
``<!-- cli-help-all -->`` a heading and the ``--help`` of every subcommand, so the command-line page cannot drift
from the parser (a new subcommand appears by itself). Building the parser imports neither torch nor mteb."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

_MARKER = re.compile(r"<!-- cli-help (\w+) -->")
_ALL_MARKER = "<!-- cli-help-all -->"


def _help_texts(repo_root: Path) -> dict[str, str]:
    if str(repo_root) not in sys.path:
        sys.path.insert(0, str(repo_root))
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


def on_page_markdown(markdown, page, config, files, **kwargs):
    if not _MARKER.search(markdown) and _ALL_MARKER not in markdown:
        return markdown
    texts = _help_texts(Path(config.config_file_path).resolve().parent)
    every = "\n\n".join(f"### `codiemb-st {name}`\n\n<!-- cli-help {name} -->" for name in texts if name)
    markdown = markdown.replace(_ALL_MARKER, every)

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name not in texts:
            raise ValueError(f"{page.file.src_path}: no codiemb-st subcommand {name!r} (known: {sorted(texts)}).")
        return "```text\n" + texts[name].rstrip() + "\n```"

    return _MARKER.sub(replace, markdown)
