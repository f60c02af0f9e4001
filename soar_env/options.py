"""Dataclass configs as command-line options: the only generator of the library.

Each config field's docstring (the string literal written under it) is its ``--help`` text,
so a setting is documented once, in its dataclass, and the CLI, README tables and error
messages read it from there (CleanRL's ``Args`` with tyro, without the dependency).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import difflib
import importlib
import inspect
import re
import textwrap
import types
import typing
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

Config = TypeVar("Config")


def field_docs(cls: type) -> dict[str, str]:
    """Map each dataclass field to the string literal written under it (base classes first)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        docs.update(_docs_in_class(tree.body[0]))  # type: ignore[arg-type]
    return {name: _resolve_references(text) for name, text in docs.items()}


def _docs_in_class(node: ast.ClassDef) -> dict[str, str]:
    """The string literal under each annotated name of a class body, whitespace folded."""
    docs = {}
    for field, following in zip(node.body, node.body[1:]):
        if (
            isinstance(field, ast.AnnAssign)
            and isinstance(field.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[field.target.id] = " ".join(following.value.value.split())
    return docs


_REFERENCE = re.compile(r"\{doc:([\w.]+)\.(\w+)\.(\w+)\}")


def _resolve_references(text: str) -> str:
    """Replace ``{doc:package.module.Class.field}`` by that field's docstring.

    A setting that several configs expose (the student's learning rate is a field of the
    RLOO updater, the student and the env) is documented once, where it is defined; the
    others write ``{doc:soar_env.rl.rloo.RLOOConfig.lr}`` and their ``--help`` shows the text.
    The referenced module is read as source, not imported, so that building a parser does
    not load torch.
    """

    def lookup(match: re.Match[str]) -> str:
        module_name, class_name, field = match.groups()
        for node in ast.parse(_module_source(module_name)).body:
            if isinstance(node, ast.ClassDef) and node.name == class_name:
                return _resolve_references(_docs_in_class(node)[field])
        raise LookupError(f"no class {class_name!r} in {module_name!r} for {match.group(0)}")

    return _REFERENCE.sub(lookup, text)


def _module_source(module_name: str) -> str:
    """Source text of ``module_name`` found from its top-level package, without importing it."""
    top, *parts = module_name.split(".")
    folder = Path(next(iter(importlib.import_module(top).__path__)))
    path = folder.joinpath(*parts)
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return path.read_text(encoding="utf-8")


def option_type(annotation: Any) -> tuple[Callable[[str], Any] | None, bool]:
    """(converter from the command-line string, is_bool) for a dataclass field annotation."""
    if isinstance(annotation, str):
        annotation = eval(annotation, vars(typing) | {"float": float, "int": int, "str": str, "bool": bool})  # noqa: S307
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        annotation = args[0] if len(args) == 1 else str
    if annotation is bool:
        return None, True
    if annotation in (int, float, str):
        return annotation, False
    return str, False


def add_dataclass_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, *,
                            skip: Iterable[str] = (), required: Iterable[str] = (), prefix: str = "",
                            dest_prefix: str = "", absent_unless_given: bool = False,
                            default_note: Callable[[dataclasses.Field], str] | None = None) -> None:
    """Add ``--{prefix}field-name`` options for the fields of ``cls``, help text from its docstrings.

    absent_unless_given: options not on the command line are left out of the namespace
        (``argparse.SUPPRESS``), so a caller can apply a preset first and the given options over it
        (``soar train``); otherwise each option defaults to the field's default.
    default_note: the "(default: ...)" text of a field, when the dataclass default is not the one
        that applies (a preset's value, say).
    """
    skip, required = set(skip), set(required)
    docs = field_docs(cls)
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        convert, is_bool = option_type(hints.get(field.name, str))
        flag = "--" + prefix + field.name.replace("_", "-")
        has_default = field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING
        default = None if field.default is dataclasses.MISSING else field.default
        is_required = field.name in required or not has_default
        help_text = docs.get(field.name, "")
        note = default_note(field) if default_note else f"default: {default}"
        if not is_required and "default" not in help_text.lower():
            # A docstring that already names its default says it better than the field value.
            help_text = f"{help_text} ({note})"
        kwargs: dict[str, Any] = {"dest": dest_prefix + field.name, "help": help_text}
        kwargs["default"] = argparse.SUPPRESS if absent_unless_given else default
        if is_bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(flag, type=convert, metavar=field.name.upper(),
                                required=is_required and not absent_unless_given, **kwargs)


def dataclass_from_args(cls: type[Config], args: argparse.Namespace) -> Config:
    """``cls(**options)`` from the parsed options that belong to it and were given."""
    return cls(**given_fields(cls, args))


def given_fields(cls: type, args: argparse.Namespace) -> dict[str, Any]:
    """The parsed options that are fields of ``cls`` and not None (None: not given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in vars(args).items() if k in names and v is not None}


def replace_checked(base: Config, overrides: dict[str, Any], what: str | None = None) -> Config:
    """``dataclasses.replace(base, **overrides)``, refusing unknown names with a close match.

    ``make_config("cpu", repeat=4)`` then says ``did you mean 'repeats'`` instead of a
    TypeError; ``replace`` re-runs ``__post_init__``, so the new values are validated too.
    """
    valid = [f.name for f in dataclasses.fields(base)]  # type: ignore[arg-type]
    unknown = [key for key in overrides if key not in valid]
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, valid, n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        name = what or type(base).__name__
        raise ValueError(f"unknown {name} setting(s): {', '.join(hints)}; valid settings: {', '.join(valid)}")
    return dataclasses.replace(base, **overrides)  # type: ignore[type-var]


def check_minimum(config: Any, names: Iterable[str], minimum: float, *, integer: bool = False,
                  optional: bool = False, label: str = "") -> None:
    """Raise ValueError naming the first of ``names`` whose value on ``config`` is below ``minimum``.

    integer: the value must also be an int (a bool is not); optional: None passes (an unset
    field). ``label`` goes before the field name ("teacher " gives "teacher lr must be ...").
    """
    for name in names:
        value = getattr(config, name)
        if optional and value is None:
            continue
        if integer:
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"{label}{name} must be an integer >= {minimum}, got {value!r}")
        elif not value >= minimum:
            raise ValueError(f"{label}{name} must be >= {minimum}, got {value!r}")
