"""Options are defined once, as dataclass fields; the command line is built from them.

`option(default, help, ...)` declares a field with what its flag needs (help, choices, group);
`add_options(parser, cls)` turns the fields into flags (defaults shown in --help), and
`from_args(cls, args)` builds the options back, so the CLI and the Python API cannot drift apart.
"""
from __future__ import annotations

import argparse
import math
import typing
from dataclasses import field, fields
from typing import Any


def option(default: Any, help: str, *, choices: tuple | None = None, group: str = "options") -> Any:
    """A dataclass field that is also a command-line flag (`--field-name`)."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group})


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
    """One flag per option field of `cls`, in declaration order, grouped as declared."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in cli_fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        flag = "--" + f.name.replace("_", "-")
        if hints[f.name] in (bool, bool | None):  # None: decided later (e.g. by what a file holds)
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=meta["help"])
        else:
            group.add_argument(flag, type=_parser_for(hints[f.name]), default=f.default, choices=meta["choices"],
                               help=meta["help"])


def from_args(cls, args: argparse.Namespace):
    """The options `cls` from parsed arguments (every option field has its flag)."""
    return cls(**{f.name: getattr(args, f.name) for f in cli_fields(cls)})


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every option's default, except where there is none to show."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, argparse.SUPPRESS) or action.help is None:
            return action.help or ""
        return super()._get_help_string(action)
