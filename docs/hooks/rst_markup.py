"""MkDocs hook: the package's docstrings keep a few reStructuredText habits (``:class:`~a.B```, ``::`` before a
code block) that Markdown prints literally. Tidy them in the rendered API pages only; the docstrings are unchanged
(the command line's ``plain_text`` does the same for ``--help``)."""

from __future__ import annotations

import re

_ROLE = re.compile(r":[a-z]+:<code>(~?)([^<]*)</code>")  # :class:`~a.b.C` -> C, :mod:`a.b` -> a.b
_TITLED = re.compile(r"^(.*?)\s*&lt;[^<]*&gt;$")  # :ref:`text <target>` -> text
_LONE_MARKER = re.compile(r"<p>::</p>\s*")  # "::" alone before a code block
_TRAILING_MARKER = re.compile(r"::</p>")  # "text::" before a code block -> "text:"


def _role(match: re.Match) -> str:
    tilde, target = match.groups()
    titled = _TITLED.match(target)
    if titled:
        target = titled.group(1)
    elif tilde:
        target = target.split(".")[-1]
    return f"<code>{target}</code>"


def on_page_content(html, page, config, files, **kwargs):
    if not page.file.src_path.startswith("api/"):
        return html
    html = _ROLE.sub(_role, html)
    html = _LONE_MARKER.sub("", html)
    return _TRAILING_MARKER.sub(":</p>", html)
