"""``codiemb-st merge``: merge sentence-transformers checkpoints with any merge method (CocktailSoup with example files).

Every option of every method in :data:`codiemb_st.merging.MERGE_METHODS` is a flag, derived from the method's
constructor (``--power``, ``--granularity``, ``--temperature``, ``--scale``, ...); a flag the chosen method does not
take is refused. The merged folder holds a model card (README.md) and merge_config.json.

Examples:
    codiemb-st merge runs/a runs/b runs/c --output merged          # Model Soup, the default
    codiemb-st merge runs/a runs/b runs/c --method cocktail_soup --examples ir-5.jsonl sts-5.jsonl --output m
    codiemb-st merge runs/a runs/b --base-model models/base --method slerp --t 0.5 --output m
    codiemb-st merge runs/a runs/b runs/c --base-model models/base --method multi_slerp --output m
    codiemb-st merge runs/a runs/b --base-model models/base --method delta_soup --power 2 --granularity row --output m
    codiemb-st merge runs/a runs/b runs/c --base-model models/base --method ties --density 0.2 --output m
    codiemb-st merge runs/a runs/b runs/c --base-model models/base --method delta_soup --sign-consensus --output m
"""

from __future__ import annotations

import argparse
import collections.abc
import inspect
import sys
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from codiemb_st.cli.output_rule import check_output_apart
from codiemb_st.cli.usage_error import UsageError

#: The method ``codiemb-st merge`` uses without ``--method``: the uniform Model Soup. The project's fusion study
#: (README "Fusion study"; paired by seed on the reproduction's runs) found no data-free rule that beats it on dev and
#: test on both tracks, and DeltaSoup (the default until 0.x) was reversed against it on held-out evaluation sets.
DEFAULT_METHOD = "model_soup"

#: The options come from the merge methods' classes, which import torch: :func:`add_arguments` runs when the parser
#: is first used (``codiemb-st merge ...``), not when ``codiemb-st --help`` builds it.
ADD_ARGUMENTS_ON_USE = True


@dataclass(frozen=True)
class MethodOption:
    """One constructor parameter of a merge method, as a command-line option."""

    #: ``"bool"``, ``"float"``, ``"int"`` or ``"str"``.
    kind: str
    #: The allowed values of a ``Literal`` parameter, else None.
    choices: tuple[str, ...] | None
    #: The default value (None when the parameter has none).
    default: Any
    #: Whether the parameter is a sequence (``Sequence[float]``, a list of paths): its flag takes one or more values.
    several: bool = False


def method_options(method: type) -> dict[str, MethodOption]:
    """The options of a merge method class: its constructor's parameters, their annotations and defaults (the one
    source, for Python and the command line).

    Example:
        ::

            method_options(TIES)  # {"density": MethodOption("float", None, 0.2), "scale": ...}
    """
    hints = typing.get_type_hints(method.__init__)
    options = {}
    for parameter in inspect.signature(method.__init__).parameters.values():
        if parameter.name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
            continue
        hint = hints.get(parameter.name, str)
        kind, choices = _kind_of_hint(hint)
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        options[parameter.name] = MethodOption(kind, choices, default, _is_sequence_hint(hint))
    return options


_SEQUENCE_ORIGINS = (list, tuple, collections.abc.Sequence)


def _is_sequence_hint(hint: Any) -> bool:
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return any(typing.get_origin(a) in _SEQUENCE_ORIGINS for a in args)


def _kind_of_hint(hint: Any) -> tuple[str, tuple[str, ...] | None]:
    if typing.get_origin(hint) is typing.Literal:
        return "str", tuple(typing.get_args(hint))
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    # Sequence[float] -> float: the flag then takes several values of the element type.
    args = [e for a in args for e in (typing.get_args(a) if typing.get_origin(a) in _SEQUENCE_ORIGINS else (a,))]
    for kind in (bool, float, int):
        if any(a is kind for a in args):
            return kind.__name__, None
    return "str", None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``codiemb-st merge``, from the registered merge methods (imports them, and so torch)."""
    from codiemb_st.merging import MERGE_METHODS

    methods = dict(sorted(MERGE_METHODS.items()))
    options = {name: method_options(method) for name, method in methods.items()}
    needs_base = [name for name, method in methods.items() if method.requires_base]
    parser.add_argument("checkpoints", nargs="+", type=Path, help="the fine-tuned sentence-transformers model folders")
    parser.add_argument(
        "--base-model",
        type=Path,
        default=None,
        help="the pre-trained model folder the checkpoints were fine-tuned from (needed by "
        f"{', '.join(needs_base)}, and by every method when a checkpoint is a LoRA adapter; default: none)",
    )
    parser.add_argument(
        "--method",
        choices=list(methods),
        default=DEFAULT_METHOD,
        help=f"merge method (default {DEFAULT_METHOD}: no data-free rule beat the uniform Model Soup in the project's "
        "paired fusion study; see docs/merging.md)",
    )
    parser.add_argument("--output", type=Path, required=True, help="the merged model folder to create")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    group = parser.add_argument_group("method options (each applies to the methods named in its help)")
    seen: dict[str, list[str]] = {}
    for method_name, method_options_ in options.items():
        for name in method_options_:
            seen.setdefault(name, []).append(method_name)
    for name, users in seen.items():
        option = options[users[0]][name]
        flag = f"--{name.replace('_', '-')}"
        if option.kind == "bool":
            group.add_argument(
                flag,
                dest=f"option_{name}",
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{', '.join(users)} (default {'on' if option.default else 'off'})",
            )
            continue
        group.add_argument(
            flag,
            dest=f"option_{name}",
            metavar=name.upper(),
            type=_CONVERTERS[option.kind],
            choices=option.choices,
            nargs="+" if option.several else None,
            default=None,
            help=_option_help(name, users, options, option.choices),
        )


_CONVERTERS = {"float": float, "int": int, "str": str}


def _option_help(
    name: str, users: list[str], options: dict[str, dict[str, MethodOption]], choices: tuple[str, ...] | None
) -> str:
    """``"delta_soup (default 1.0)"``; each method's own default when the methods sharing the flag differ."""
    defaults = {method: options[method][name].default for method in users}
    one_of = f"; one of {', '.join(choices)}" if choices else ""
    if len({repr(default) for default in defaults.values()}) > 1:
        return ", ".join(f"{method} (default {default})" for method, default in defaults.items()) + one_of
    return f"{', '.join(users)} (default {next(iter(defaults.values()))}{one_of})"


def run(args: argparse.Namespace) -> int:
    """Run ``codiemb-st merge`` with parsed arguments; returns the exit code."""
    from codiemb_st.merging import MERGE_METHODS

    method_class = MERGE_METHODS[args.method]
    accepted = method_options(method_class)
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
    # The one output rule, before any model is read: --output is not, does not hold and does not lie inside anything
    # the merge reads (the merge replaces the output folder as a whole).
    inputs = [("checkpoint", path) for path in args.checkpoints]
    inputs += [("--base-model", args.base_model)]
    inputs += [("--examples", path) for path in given.get("examples") or []]
    check_output_apart(args.output, "--output", inputs, replaces_folder=True)
    for path in [*args.checkpoints, *([args.base_model] if args.base_model else [])]:
        if not path.is_dir():
            raise UsageError(f"{path} is not a model folder.")
    try:
        output = method.merge_to_folder(
            args.checkpoints, args.output, base_model=args.base_model, show_progress_bar=not args.no_progress
        )
    except (ValueError, TypeError, FileExistsError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None
    except OSError as error:  # a full disk, no permission: nothing was left at --output
        raise UsageError(f"Could not write {args.output} (nothing was left there): {error}") from None
    print(f"Merged {len(args.checkpoints)} checkpoint(s) with {method!r} into {output}", file=sys.stderr)
    return 0


__all__ = ["ADD_ARGUMENTS_ON_USE", "DEFAULT_METHOD", "MethodOption", "add_arguments", "method_options", "run"]
