"""User-facing failures: the CLI prints them as one line and exits with `exit_code`."""
import math


class FastfeatError(Exception):
    """A failure the user can act on (runtime problem): exit code 1."""

    exit_code = 1


class InputError(FastfeatError):
    """Bad input: missing data, bad weights, existing output, wrong arguments: exit code 2."""

    exit_code = 2


def check_number(flag: str, value: float, low: float = 0.0, high: float = math.inf, low_open: bool = False) -> None:
    """Refuse in one line a number outside [low, high) (or (low, high) when `low_open`), nan and inf included:
    a nan learning rate would train to nan without a word."""
    inside = math.isfinite(value) and (value > low if low_open else value >= low) and value < high
    if not inside:
        bounds = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and < {high:g}")
        raise InputError(f"{flag} must be a finite number {bounds}, got {value}")


def refused_pickle(what: str, path: object, allowed: str, culprit: str) -> InputError:
    """The line for a file that only full unpickling could load, which would call `culprit` (any code)."""
    return InputError(f"refusing {what} {path}: it holds Python objects other than {allowed} ({culprit}); "
                      "fastfeat never unpickles code")
