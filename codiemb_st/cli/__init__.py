"""The ``codiemb-st`` command line: ``eval``, ``merge``, ``mine``, ``score`` and ``train`` (also ``python -m codiemb_st``).

Each subcommand is a thin layer over the library (:mod:`codiemb_st.evaluation`, :mod:`codiemb_st.merging`,
:mod:`codiemb_st.recipe`); problems the user can fix are printed as ``error: ...`` with exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from codiemb_st.cli import eval_command, merge_command, mine_command, score_command, train_command
from codiemb_st.cli.usage_error import UsageError

COMMANDS = {
    "eval": (eval_command, "evaluate models on mteb tasks (local data first), side by side"),
    "merge": (merge_command, "merge sentence-transformers checkpoints (DeltaSoup, ModelSoup, TaskArithmetic, ...)"),
    "mine": (mine_command, "mine hard negatives for IR records (multi-positive, in the records' own format)"),
    "score": (score_command, "add teacher scores (cross-encoder or bi-encoder) to IR records, for distillation"),
    "train": (train_command, "train with the CoDiEmb recipe (both task losses, single-task steps)"),
}


def plain_text(doc: str) -> str:
    """A reStructuredText docstring as terminal text: ``code`` -> code, :class:`~a.B` -> B, :mod:`a.b` -> a.b."""
    doc = re.sub(r":[a-z]+:`~?([^`<]*?)\s*<[^`]*>`", r"\1", doc)  # :ref:`text <target>` -> text
    doc = re.sub(r":[a-z]+:`~([^`]*)`", lambda m: m.group(1).split(".")[-1], doc)
    doc = re.sub(r":[a-z]+:`([^`]*)`", r"\1", doc)
    return re.sub(r"``([^`]*)``", r"\1", doc).replace("\\\\", "\\")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written, and every option's default shown in ``--help`` (unless its help already says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        if action.required:
            return f"{help_text} (required)".lstrip()
        if not action.option_strings or "default" in help_text.lower() or action.default is argparse.SUPPRESS:
            return help_text
        if action.default is None or action.default is False or action.default == []:
            return help_text  # a flag that is off, or an option that is unset: nothing to show
        default = " ".join(map(str, action.default)) if isinstance(action.default, (list, tuple)) else action.default
        return f"{help_text} (default: {str(default).replace('%', '%%')})".lstrip()


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser whose options may be added when it is first used (parsed, or its help or usage shown).

    ``codiemb-st merge`` reads its options from the merge methods' classes, which import torch (seconds): building
    that parser for ``codiemb-st --help`` or another subcommand must not import them.

    Args:
        add_arguments_on_use: Adds the options to this parser; called once, at first use. None: none to add.
    """

    def __init__(
        self, *args: Any, add_arguments_on_use: Callable[[argparse.ArgumentParser], None] | None = None, **kwargs: Any
    ) -> None:
        self._pending: Callable[[argparse.ArgumentParser], None] | None = None
        super().__init__(*args, **kwargs)
        self._pending = add_arguments_on_use

    def _add_pending_arguments(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending(self)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None) -> Any:
        self._add_pending_arguments()
        return super().parse_known_args(args, namespace)

    def _get_formatter(self) -> argparse.HelpFormatter:
        # argparse formats --help, usage lines and errors through this method: the options must exist by then.
        self._add_pending_arguments()
        return super()._get_formatter()


def build_parser() -> argparse.ArgumentParser:
    """The ``codiemb-st`` parser with its subcommands."""
    from codiemb_st import __version__

    parser = argparse.ArgumentParser(
        prog="codiemb-st", description="CoDiEmb for sentence-transformers: evaluate, merge and train embedding models."
    )
    parser.add_argument("--version", action="version", version=f"codiemb-st {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=CommandParser)
    for name, (module, summary) in COMMANDS.items():
        on_use = getattr(module, "ADD_ARGUMENTS_ON_USE", False)  # options that need heavy imports: added when used
        sub = subparsers.add_parser(
            name,
            help=summary,
            description=plain_text(module.__doc__ or ""),
            formatter_class=HelpFormatter,
            add_arguments_on_use=module.add_arguments if on_use else None,
        )
        if not on_use:
            module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``codiemb-st`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.command in ("train", "mine", "score") else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if args.command == "eval":
        # The local STSBenchmark is the (v1) data MiniLM's published score refers to; mteb's hint at v2 is noise.
        warnings.filterwarnings("ignore", message=".*is superseded by.*")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    try:
        return args.run(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


__all__ = ["COMMANDS", "CommandParser", "HelpFormatter", "UsageError", "build_parser", "main"]
