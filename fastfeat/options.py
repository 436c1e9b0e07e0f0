"""Options are defined once, as dataclass fields; the command line is built from them.

`option(default, help, ...)` declares a field with what its flag needs (help, group) and what its values may be
(choices, range, a size in bytes); `Checked` refuses any other value in one line naming the flag, for the CLI and
the Python API alike; `add_options(parser, cls)` turns the fields into flags (defaults shown in --help), and
`from_args(cls, args)` builds the options back, so the CLI and the Python API cannot drift apart. Only the
mechanism lives here: each command's options are in settings.py.
"""
from __future__ import annotations

import argparse
import math
import re
import typing
from dataclasses import field, fields
from typing import Any

from .errors import InputError


def option(default: Any, help: str, *, choices: tuple | None = None, group: str = "options", min: float | None = None,
           above: float | None = None, below: float | None = None, positional: bool = False,
           required: bool = False, size: bool = False) -> Any:
    """A dataclass field that is also a command-line flag (`--field-name`, or a positional argument).

    Its values are checked where it is declared, for the CLI and the Python API alike (`Checked`):
    `choices`, `min` <= value, `above` < value, value < `below`; a list (tuple) has at least one item,
    each checked so. A `size` is a positive number of bytes, given as text such as 512MB (the flag's) or
    as an int, and held as the int."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "min": min,
                                            "above": above, "below": below, "positional": positional,
                                            "required": required, "size": size})


SEED = {"min": 0, "below": 2**32}  # what numpy's and torch's generators take
SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


class Checked:
    """Options whose every field is checked against its declaration when they are made (or replaced);
    a size given as text is held as its bytes."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in cli_fields(type(self)):
            value = getattr(self, f.name)
            if f.metadata["size"]:
                object.__setattr__(self, f.name, size_value(flag_name(f), value))
            else:
                check_value(flag_name(f), value, {**f.metadata, "whole": _item(hints[f.name]) is int})


def flag_name(f) -> str:
    return f.name if f.metadata["positional"] else "--" + f.name.replace("_", "-")


def check_value(flag: str, value: Any, meta: dict) -> None:
    """One InputError line naming `flag` for a value outside its declaration; None means "the default"."""
    if value is None:
        return
    if isinstance(value, tuple):
        if not value:
            raise InputError(f"{flag} needs at least one value")
        for item in value:
            check_value(flag, item, meta)
        return
    if meta["choices"] is not None and value not in meta["choices"]:
        raise InputError(f"{flag} must be one of {', '.join(map(str, meta['choices']))}, got {value!r}")
    if meta.get("whole") and (not isinstance(value, int) or isinstance(value, bool)):
        raise InputError(f"{flag} must be a whole number, got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        _check_range(flag, value, meta)


def _check_range(flag: str, value: float, meta: dict) -> None:
    low, above, below = meta["min"], meta["above"], meta["below"]
    inside = (math.isfinite(value) and (low is None or value >= low) and (above is None or value > above)
              and (below is None or value < below))
    if not inside:
        bounds = [f">= {low:g}" if low is not None else "", f"> {above:g}" if above is not None else "",
                  f"< {below}" if below is not None else ""]
        kind = "a whole number" if isinstance(value, int) else "a finite number"
        raise InputError(f"{flag} must be {kind} {' and '.join(b for b in bounds if b)}, got {value}")


def parse_size(text: str) -> int:
    """Bytes in a size such as `512MB`, `8GB`, `1.5GiB`, `100` (MB = 10**6, MiB = 2**20); 0 for text that
    is no size."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match and SIZE_UNITS.get(match.group(2).lower())
    return int(float(match.group(1)) * unit) if unit else 0


def size_value(flag: str, value: Any) -> int | None:
    """The bytes of a size option's value (text or an int; None means "the default"), or one InputError line."""
    if value is None:
        return None
    size = parse_size(value) if isinstance(value, str) else value
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise InputError(f"{flag} must be a positive size such as 512MB or 8GB, got {value!r}")
    return size


def finite_float(text: str) -> float:
    """argparse type: a finite number (float() also accepts nan and inf, which no training can use)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


PARSERS = {int: int, float: finite_float, str: str}


def _plain(hint):
    """`X` of an `X | None` annotation."""
    optional = [arg for arg in typing.get_args(hint) if arg is not type(None)]
    return optional[0] if typing.get_origin(hint) is not tuple and optional else hint


def _item(hint):
    """The type of one value of a field: `int` for `int | None` and for `tuple[int, ...]`."""
    hint = _plain(hint)
    return typing.get_args(hint)[0] if typing.get_origin(hint) is tuple else hint


def _parser_for(hint) -> typing.Callable[[str], Any]:
    """The argparse type of a field's annotation: `int`, `float | None`, or a comma-separated list
    for `tuple[str, ...]` and `tuple[int, ...]`."""
    if typing.get_origin(hint) is tuple:
        return _comma_list(_parser_for(typing.get_args(hint)[0]))
    optional = [arg for arg in typing.get_args(hint) if arg is not type(None)]  # `X | None`
    return _parser_for(optional[0]) if optional else PARSERS[hint]


def _comma_list(item: typing.Callable[[str], Any]) -> typing.Callable[[str], tuple]:
    def parse(text: str) -> tuple:
        return tuple(item(part.strip()) for part in text.split(",") if part.strip())

    parse.__name__ = f"comma-separated {item.__name__}"  # argparse names it in "invalid ... value"
    return parse


def cli_fields(cls) -> list:
    return [f for f in fields(cls) if "help" in f.metadata]


def add_options(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per option field of `cls`, in declaration order, grouped as declared; argparse only parses
    (the values are checked by `Checked`: a size stays text until then), the choices are shown as the flag's
    metavar."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if hints[f.name] in (bool, bool | None, bool | str):  # None: decided later (by a file); str: "auto" (--compile)
            group.add_argument(flag_name(f), action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
            continue
        metavar = "{" + ",".join(map(str, meta["choices"])) + "}" if meta["choices"] else "SIZE" if meta["size"] else None
        if meta["positional"]:
            hint = _plain(hints[f.name])
            many = typing.get_origin(hint) is tuple
            group.add_argument(f.name, nargs="*" if many else None, metavar=metavar, help=meta["help"],
                               type=_parser_for(typing.get_args(hint)[0] if many else hint))
        else:
            parse = str if meta["size"] else _parser_for(hints[f.name])
            group.add_argument(flag_name(f), type=parse, default=f.default, metavar=metavar,
                               required=meta["required"], help=meta["help"])


def from_args(cls, args: argparse.Namespace):
    """The options `cls` from parsed arguments (every option field has its flag), checked."""
    hints = typing.get_type_hints(cls)
    values = {f.name: getattr(args, f.name) for f in cli_fields(cls)}
    return cls(**{name: (tuple(value) or None) if isinstance(value, list) and typing.get_origin(_plain(hints[name])) is tuple
                  else value for name, value in values.items()})  # a positional list: none given is None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, argparse.SUPPRESS) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)
