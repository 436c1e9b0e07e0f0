"""User-facing failures: the CLI prints them as one line and exits with `exit_code`."""


class FastfeatError(Exception):
    """A failure the user can act on (runtime problem): exit code 1."""

    exit_code = 1


class InputError(FastfeatError):
    """Bad input: missing data, bad weights, existing output, wrong arguments: exit code 2."""

    exit_code = 2


def refused_pickle(what: str, path: object, allowed: str, culprit: str) -> InputError:
    """The line for a file that only full unpickling could load, which would call `culprit` (any code)."""
    return InputError(f"refusing {what} {path}: it holds Python objects other than {allowed} ({culprit}); "
                      "fastfeat never unpickles code")
