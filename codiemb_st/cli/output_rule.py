"""The command line's one output rule: no command writes onto, or inside, anything it reads.

Every subcommand that writes (``mine --output``, ``train --output-dir``, ``merge --output``, ``eval --output-dir``)
calls :func:`check_output_apart` with everything it reads, before any model is loaded, so a typo such as
``mine IN --corpus PASSAGES --output PASSAGES`` is refused at once instead of replacing the corpus.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from codiemb_st.cli.usage_error import UsageError


def check_output_apart(
    output: str | os.PathLike,
    output_option: str,
    inputs: Iterable[tuple[str, str | os.PathLike | None]],
    *,
    replaces_folder: bool = False,
) -> None:
    """Refuse an output that is, or lies inside, one of the inputs.

    Paths are compared after resolving symlinks and ``..``, so ``runs/../data.jsonl`` and a link to it are the same
    file.

    Args:
        output: The file or folder the command writes.
        output_option: Its option, for the message (``--output``).
        inputs: ``(option, path)`` pairs of everything the command reads (records, corpus, checkpoints, examples,
            evaluation data); ``None`` paths (hub names, unset options) are skipped.
        replaces_folder: The output folder is replaced as a whole (a merge renames a new folder into place), so an
            input *inside* it would be lost too: refused as well.

    Raises:
        UsageError: Naming the output, the input and the fix.

    Example:
        ::

            check_output_apart(args.output, "--output", [("input", args.input), *(("--corpus", c) for c in corpus)])
    """
    target = Path(output).expanduser().resolve()
    for option, path in inputs:
        if path is None:
            continue
        source = Path(path).expanduser().resolve()
        if target == source:
            problem = "is"
        elif target.is_relative_to(source) and source.is_dir():
            problem = "is inside"
        elif replaces_folder and source.is_relative_to(target):
            problem = "would replace the folder holding"
        else:
            continue
        raise UsageError(
            f"{output_option} {output} {problem} the {option} {path}: nothing is written onto what a command reads. "
            f"Choose another {output_option}."
        )


__all__ = ["check_output_apart"]
