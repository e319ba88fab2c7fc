"""Command-line options generated from a config dataclass, so each default is declared once.

Every field becomes `--field-name` (underscores as dashes) with the field's default, its type
(`int | None` -> int), and the help and choices of its metadata. Metadata may also rename the
flag (`"flag"`), or invert a boolean (`"inverted": True`: `--eager` stores False into
`use_compiled`). Booleans that default to True get `--X` and `--no-X`, those that default to
False get `--X`, and those that default to None get both and keep None when neither is given.
`values(args, cls)` reads the fields back from the parsed arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any


def _value_type(hint: Any) -> Any:
    """int for `int`, `int | None` or `Optional[int]`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        (hint,) = [a for a in typing.get_args(hint) if a is not type(None)]
    return hint


def flag_name(field: dataclasses.Field[Any]) -> str:
    """The option of `field`, without leading dashes (booleans defaulting to True also take `no-`)."""
    return str(field.metadata.get("flag", field.name.replace("_", "-")))


def add_options(parser: argparse.ArgumentParser, cls: type, *, exclude: tuple[str, ...] = ()) -> None:
    """One option per field of the dataclass `cls`, except the fields in `exclude`."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in exclude:
            continue
        kind = _value_type(hints[field.name])
        option = "--" + flag_name(field)
        text = str(field.metadata.get("help", "")).replace("%", "%%")
        if kind is bool:
            if field.metadata.get("inverted"):
                parser.add_argument(option, dest=field.name, action="store_false", default=field.default, help=text)
            elif field.default is False:
                parser.add_argument(option, dest=field.name, action="store_true", default=False, help=text)
            else:
                action = argparse.BooleanOptionalAction
                parser.add_argument(option, dest=field.name, action=action, default=field.default, help=text)
            continue
        if field.default is not None:
            text = f"{text} (default: {field.default})" if text else f"default: {field.default}"
        choices = field.metadata.get("choices")
        parser.add_argument(
            option, dest=field.name, type=kind, default=field.default, choices=choices, help=text or None
        )


def values(args: argparse.Namespace, cls: type, *, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of `cls` as parsed by options from `add_options` (with the same `exclude`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if f.name not in exclude}


__all__ = ["add_options", "flag_name", "values"]
