"""``codiemb-st merge``: merge sentence-transformers checkpoints with any merge method (CocktailSoup with example files).

Every option of every method in :data:`codiemb_st.merging.MERGE_METHODS` is a flag, derived from the method's
constructor (``--power``, ``--granularity``, ``--temperature``, ``--scale``, ...); a flag the chosen method does not
take is refused.

Examples:
    codiemb-st merge runs/a runs/b runs/c --output merged          # Model Soup, the default
    codiemb-st merge runs/a runs/b runs/c --method cocktail_soup --examples ir-5.jsonl sts-5.jsonl --output m
    codiemb-st merge runs/a runs/b --base-model models/base --method slerp --t 0.5 --output m
    codiemb-st merge runs/a runs/b runs/c --base-model models/base --method multi_slerp --output m
    codiemb-st merge runs/a runs/b --base-model models/base --method delta_soup --power 2 --granularity row --output m
    codiemb-st merge runs/a runs/b runs/c --base-model models/base --method ties --density 0.2 --output m
    codiemb-st merge runs/a runs/b runs/c --base-model models/base --method delta_soup --sign-consensus true --output m
"""

from __future__ import annotations

import argparse
import collections.abc
import inspect
import sys
import typing
from pathlib import Path
from typing import Any

from codiemb_st.cli.usage_error import UsageError

#: The method ``codiemb-st merge`` uses without ``--method``: the uniform Model Soup. The project's fusion study
#: (README "Fusion study"; paired by seed on the reproduction's runs) found no data-free rule that beats it on dev and
#: test on both tracks, and DeltaSoup (the default until 0.x) was reversed against it on held-out evaluation sets.
DEFAULT_METHOD = "model_soup"


def _method_parameters() -> dict[str, dict[str, inspect.Parameter]]:
    from codiemb_st.merging import MERGE_METHODS

    return {
        name: {
            parameter.name: parameter
            for parameter in inspect.signature(method.__init__).parameters.values()
            if parameter.name != "self"
            and parameter.kind not in (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)
        }
        for name, method in MERGE_METHODS.items()
    }


def _converter(method_name: str, parameter: inspect.Parameter) -> Any:
    """A string -> value converter from the parameter's annotation (string annotations: from __future__)."""
    from codiemb_st.merging import MERGE_METHODS

    hints = typing.get_type_hints(MERGE_METHODS[method_name].__init__)
    hint = hints.get(parameter.name, str)
    if typing.get_origin(hint) is typing.Literal:
        return str, typing.get_args(hint)  # e.g. Literal["element", "row", "tensor"]
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    sequences = [a for a in args if typing.get_origin(a) in (list, tuple, collections.abc.Sequence)]
    if sequences:  # e.g. Sequence[float]: one flag, several values (nargs="+")
        args = [a for a in typing.get_args(sequences[0]) if a is not type(None)]
    if any(a is bool for a in args):
        return _parse_bool, None  # e.g. --sign-consensus true
    if any(a is float for a in args):
        return float, None
    if any(a is int for a in args):
        return int, None
    return str, None


def _takes_several(method_name: str, parameter: inspect.Parameter) -> bool:
    """Whether the parameter is annotated as a sequence (its flag then takes one or more values)."""
    from codiemb_st.merging import MERGE_METHODS

    hint = typing.get_type_hints(MERGE_METHODS[method_name].__init__).get(parameter.name, str)
    args = typing.get_args(hint) or (hint,)
    return any(typing.get_origin(a) in (list, tuple, collections.abc.Sequence) for a in args)


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


_parse_bool.__name__ = "bool"  # argparse names the type in its error message


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``codiemb-st merge``."""
    from codiemb_st.merging import MERGE_METHODS

    parser.add_argument("checkpoints", nargs="+", type=Path, help="the fine-tuned sentence-transformers model folders")
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="the pre-trained model folder the checkpoints were fine-tuned from (needed by delta_soup and "
        "task_arithmetic)",
    )
    parser.add_argument(
        "--method",
        choices=sorted(MERGE_METHODS),
        default=DEFAULT_METHOD,
        help=f"merge method (default {DEFAULT_METHOD}: no data-free rule beat the uniform Model Soup in the project's "
        "paired fusion study; see the README)",
    )
    parser.add_argument("--output", type=Path, required=True, help="the merged model folder to create")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group("method options (each applies to the methods named in its help)")
    all_parameters = _method_parameters()
    seen: dict[str, list[str]] = {}
    for method_name, parameters in all_parameters.items():
        for name in parameters:
            seen.setdefault(name, []).append(method_name)
    for name, methods in seen.items():
        parameter = all_parameters[methods[0]][name]
        convert, choices = _converter(methods[0], parameter)
        default = parameter.default if parameter.default is not inspect.Parameter.empty else None
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=f"option_{name}",
            metavar=name.upper(),
            type=convert,
            choices=choices,
            nargs="+" if _takes_several(methods[0], parameter) else None,
            default=None,
            help=_option_help(name, methods, all_parameters, default, choices),
        )


def _option_help(
    name: str,
    methods: list[str],
    all_parameters: dict[str, dict[str, inspect.Parameter]],
    default: Any,
    choices: Any,
) -> str:
    """``"delta_soup (default 1.0)"``; each method's own default when the methods sharing the flag differ."""
    defaults = {m: all_parameters[m][name].default for m in methods}
    if len({repr(d) for d in defaults.values()}) > 1:
        text = ", ".join(f"{m} (default {'none' if d is inspect.Parameter.empty else d})" for m, d in defaults.items())
        return text + (f"; one of {', '.join(choices)}" if choices else "")
    return f"{', '.join(methods)} (default {default}" + (f"; one of {', '.join(choices)})" if choices else ")")


def run(args: argparse.Namespace) -> int:
    """Run ``codiemb-st merge`` with parsed arguments; returns the exit code."""
    from codiemb_st.merging import MERGE_METHODS

    method_class = MERGE_METHODS[args.method]
    accepted = _method_parameters()[args.method]
    given = {
        key.removeprefix("option_"): value
        for key, value in vars(args).items()
        if key.startswith("option_") and value is not None
    }
    foreign = sorted(set(given) - set(accepted))
    if foreign:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in foreign)
        raise UsageError(f"--method {args.method} does not take {flags} (it takes: {', '.join(accepted) or 'none'}).")
    try:
        method = method_class(**given)
    except (TypeError, ValueError) as error:
        raise UsageError(f"Bad option for {args.method}: {error}") from None
    if method.requires_base and args.base_model is None:
        raise UsageError(f"--method {args.method} needs --base-model: the model the checkpoints were fine-tuned from.")
    for path in [*args.checkpoints, *([args.base_model] if args.base_model else [])]:
        if not path.is_dir():
            raise UsageError(f"{path} is not a model folder.")
    try:
        output = method.merge_to_folder(
            args.checkpoints, args.output, base_model=args.base_model, show_progress_bar=not args.no_progress
        )
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    print(f"Merged {len(args.checkpoints)} checkpoint(s) with {method!r} into {output}", file=sys.stderr)
    return 0


__all__ = ["add_arguments", "run"]
