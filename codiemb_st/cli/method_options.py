"""The merge methods' options for ``codiemb-st merge``, derived from their constructors, without importing torch.

``codiemb-st merge --help`` lists every option of every method in :data:`codiemb_st.merging.MERGE_METHODS`. Importing
the methods imports torch (seconds), so the help reads the same facts from the source of :mod:`codiemb_st.merging`
instead: the ``MERGE_METHODS`` table, each class's ``__init__`` parameters (annotation and default) and its
``requires_base``. :func:`method_specs_from_classes` derives them from the imported classes; a test checks that both
agree, and when the source cannot be read that way (a table built differently), the classes are imported.
"""

from __future__ import annotations

import ast
import inspect
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MERGING_SOURCE = Path(__file__).resolve().parents[1] / "merging"


@dataclass(frozen=True)
class MethodOption:
    """One constructor parameter of a merge method, as a command-line option."""

    #: ``"bool"``, ``"float"``, ``"int"`` or ``"str"``.
    kind: str
    #: The allowed values of a ``Literal`` parameter, else None.
    choices: tuple[str, ...] | None
    #: The default value (None when the parameter has none).
    default: Any


@dataclass(frozen=True)
class MethodSpec:
    """What the command line needs to know about one merge method."""

    requires_base: bool
    options: dict[str, MethodOption]


def method_specs() -> dict[str, MethodSpec]:
    """``{method name: spec}`` in ``MERGE_METHODS`` order: from the source when possible (no torch), else the classes."""
    specs = method_specs_from_source()
    return specs if specs is not None else method_specs_from_classes()


def method_specs_from_classes() -> dict[str, MethodSpec]:
    """The specs of the imported merge methods (imports torch)."""
    from codiemb_st.merging import MERGE_METHODS

    specs = {}
    for name, method in MERGE_METHODS.items():
        hints = typing.get_type_hints(method.__init__)
        options = {}
        for parameter in inspect.signature(method.__init__).parameters.values():
            if parameter.name == "self" or parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            kind, choices = _kind_of_hint(hints.get(parameter.name, str))
            default = None if parameter.default is inspect.Parameter.empty else parameter.default
            options[parameter.name] = MethodOption(kind, choices, default)
        specs[name] = MethodSpec(bool(method.requires_base), options)
    return specs


def _kind_of_hint(hint: Any) -> tuple[str, tuple[str, ...] | None]:
    if typing.get_origin(hint) is typing.Literal:
        return "str", tuple(typing.get_args(hint))
    args = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    for kind in (bool, float, int):
        if any(a is kind for a in args):
            return kind.__name__, None
    return "str", None


def method_specs_from_source() -> dict[str, MethodSpec] | None:
    """The specs read from the source files of :mod:`codiemb_st.merging`, or None if they cannot be read that way."""
    classes: dict[str, ast.ClassDef] = {}
    aliases: dict[str, ast.expr] = {}
    table: dict[str, str] | None = None
    try:
        trees = [ast.parse(path.read_text(encoding="utf-8")) for path in sorted(MERGING_SOURCE.glob("*.py"))]
    except (OSError, SyntaxError, UnicodeDecodeError):
        return None
    for tree in trees:
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                classes[node.name] = node
            target, value = _assignment(node)
            if target is None or value is None:
                continue
            if target == "MERGE_METHODS":
                table = _literal_table(value)
                if table is None:
                    return None
            else:
                aliases[target] = value
    if table is None or not all(name in classes for name in table.values()):
        return None
    specs = {}
    for method_name, class_name in table.items():
        init = _find_init(class_name, classes)
        requires_base = _class_attribute(class_name, classes, "requires_base")
        if init is None or not isinstance(requires_base, bool):
            return None
        options = {}
        arguments = init.args
        positional = [*arguments.posonlyargs, *arguments.args][1:]  # without self
        defaults: list[ast.expr | None] = [None] * (len(positional) - len(arguments.defaults))
        defaults += list(arguments.defaults)
        pairs = [*zip(positional, defaults), *zip(arguments.kwonlyargs, arguments.kw_defaults)]
        for argument, default in pairs:
            kind = _kind_of_annotation(argument.annotation, aliases)
            if kind is None:
                return None
            try:
                value = ast.literal_eval(default) if default is not None else None
            except ValueError:
                return None
            options[argument.arg] = MethodOption(kind[0], kind[1], value)
        specs[method_name] = MethodSpec(requires_base, options)
    return specs


def _assignment(node: ast.stmt) -> tuple[str | None, ast.expr | None]:
    if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        return node.targets[0].id, node.value
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return node.target.id, node.value
    return None, None


def _literal_table(value: ast.expr) -> dict[str, str] | None:
    if not isinstance(value, ast.Dict):
        return None
    table = {}
    for key, item in zip(value.keys, value.values):
        if not (isinstance(key, ast.Constant) and isinstance(key.value, str) and isinstance(item, ast.Name)):
            return None
        table[key.value] = item.id
    return table


def _bases(class_name: str, classes: dict[str, ast.ClassDef]) -> list[ast.ClassDef]:
    """The class and its bases defined in the merging package, in method resolution order (single inheritance)."""
    chain = []
    while class_name in classes and len(chain) < 20:
        node = classes[class_name]
        chain.append(node)
        names = [base.id for base in node.bases if isinstance(base, ast.Name) and base.id in classes]
        class_name = names[0] if names else ""
    return chain


def _find_init(class_name: str, classes: dict[str, ast.ClassDef]) -> ast.FunctionDef | None:
    for node in _bases(class_name, classes):
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                return item
    # No __init__ in the package's classes: object's (no options).
    return ast.parse("def __init__(self): pass").body[0]  # type: ignore[return-value]


def _class_attribute(class_name: str, classes: dict[str, ast.ClassDef], attribute: str) -> Any:
    for node in _bases(class_name, classes):
        for item in node.body:
            target, value = _assignment(item)
            if target == attribute and value is not None:
                try:
                    return ast.literal_eval(value)
                except ValueError:
                    return None
    return None


def _kind_of_annotation(annotation: ast.expr | None, aliases: dict[str, ast.expr]) -> tuple[str, Any] | None:
    if annotation is None:
        return "str", None
    if isinstance(annotation, ast.Constant) and isinstance(annotation.value, str):
        annotation = ast.parse(annotation.value, mode="eval").body
    if isinstance(annotation, ast.Name) and annotation.id in aliases:
        annotation = aliases[annotation.id]
    if isinstance(annotation, ast.Subscript) and isinstance(annotation.value, ast.Name):
        if annotation.value.id == "Literal":
            elements = annotation.slice.elts if isinstance(annotation.slice, ast.Tuple) else [annotation.slice]
            if not all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in elements):
                return None
            return "str", tuple(e.value for e in elements)
        if annotation.value.id == "Optional":
            return _kind_of_annotation(annotation.slice, aliases)
        return None
    names: list[str] = []
    stack = [annotation]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr):
            stack += [node.left, node.right]
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Constant) and node.value is None:
            names.append("None")
        else:
            return None
    for kind in ("bool", "float", "int"):
        if kind in names:
            return kind, None
    return "str", None


__all__ = ["MethodOption", "MethodSpec", "method_specs", "method_specs_from_classes", "method_specs_from_source"]
