"""User-facing failures: the CLI prints them as one line and exits with `exit_code`."""


class FastfeatError(Exception):
    """A failure the user can act on (runtime problem): exit code 1."""

    exit_code = 1


class InputError(FastfeatError):
    """Bad input: missing data, bad weights, existing output, wrong arguments: exit code 2."""

    exit_code = 2
